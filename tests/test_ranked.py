"""Mixed batches over a stack of several ranks: each rank class at its own rank when the
``adapter_ids`` are known at trace time (``jlora._src.interpret.ranked``)."""

import jax
import jax.numpy as jnp
import llama
import numpy as np
import pytest

import jlora
from conftest import F32, randomize

RANKED = "factored (mixed batch: each rank class at its own rank)"
GATHERED = "factored (mixed batch: each example gathers its adapter's factors)"
D, O, S = 128, 96, 8
RANKS = (8, 16, 32, 64)


def _adapters(params, targets, ranks=RANKS):
    return [
        randomize(
            jlora.init(
                jax.random.key(r),
                params,
                jlora.LoraConfig(rank=r, alpha=2.0 * r, rslora=i % 2 == 1, targets=targets),
            ),
            jax.random.key(i),
            0.1,
        )
        for i, r in enumerate(ranks)
    ]


def _flops(f, *args) -> float:
    return jax.jit(f).lower(*args).compile().cost_analysis()["flops"]


def test_low_rank_flops_are_the_sum_of_each_adapters_own(key):
    """XLA's count of the mixed call's FLOPs beyond the base's equals the sum of each row
    through its adapter alone, where padding every adapter to rank 64 costs 2.6x."""
    params = {"w": jax.random.normal(key, (D, O))}
    fn = lambda p, x: x @ p["w"]
    ads = _adapters(params, "w")
    stacked, x = jlora.stack(ads), jax.random.normal(key, (6, S, D))
    ids = np.array([0, 1, 2, 3, -1, 1])
    f = jlora.apply(fn)
    base = _flops(lambda x: fn(params, x), x)
    ranked = _flops(lambda x: f(params, stacked, x, adapter_ids=ids), x) - base
    padded = _flops(lambda x, i: f(params, stacked, x, adapter_ids=i), x, jnp.asarray(ids)) - base
    own = sum(
        _flops(lambda x: f(params, ads[k], x), x[:1]) - _flops(lambda x: fn(params, x), x[:1])
        for k in ids
        if k >= 0
    )
    assert ranked == pytest.approx(own, rel=0.01), (ranked, own)
    assert padded > 2.5 * own, (padded, own)
    assert jlora.explain(fn, params, stacked, x, adapter_ids=ids)["w"] == [RANKED]


@pytest.mark.parametrize("scan", [True, False])
def test_each_row_equals_its_adapter_alone_and_gradients_the_padded_path(scan, key):
    cfg = llama.LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        scan_layers=scan,
    )
    model, params = llama.Llama(cfg), llama.init_params(cfg, key)
    ads = _adapters(params, ("q_proj", "o_proj", "down_proj"), ranks=(2, 4, 8))
    stacked = jlora.stack(ads)
    x = jax.random.randint(key, (5, 7), 0, 32)
    ids = np.array([2, 0, -1, 1, 2])
    f = jlora.apply(model.apply)
    got = jax.jit(lambda st, x: f(params, st, x, adapter_ids=ids))(stacked, x)
    for row, k in enumerate(ids):
        want = (
            model.apply(params, x[row : row + 1]) if k < 0 else f(params, ads[k], x[row : row + 1])
        )
        np.testing.assert_allclose(got[row : row + 1], want, **F32)
    assert set(
        sum(jlora.explain(model.apply, params, stacked, x, adapter_ids=ids).values(), [])
    ) == {RANKED}
    loss = lambda st, i: jnp.sum(jnp.tanh(f(params, st, x, adapter_ids=i)))
    ranked = jax.grad(lambda st: loss(st, ids))(stacked)
    padded = jax.jit(jax.grad(loss))(stacked, jnp.asarray(ids))
    for g, w in zip(jax.tree.leaves(ranked), jax.tree.leaves(padded)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))


def test_traced_ids_and_one_rank_keep_the_gather(key):
    params = {"w": jax.random.normal(key, (D, O))}
    fn = lambda p, x: x @ p["w"]
    x = jax.random.normal(key, (2, S, D))
    mixed = jlora.stack(_adapters(params, "w", (4, 8)))
    same = jlora.stack(_adapters(params, "w", (8, 8)))
    traced = jax.ShapeDtypeStruct((2,), jnp.int32)  # ids known only when the call runs
    assert jlora.explain(fn, params, mixed, x, adapter_ids=traced)["w"] == [GATHERED]
    assert jlora.explain(fn, params, same, x, adapter_ids=np.array([0, 1]))["w"] == [GATHERED]
    f = jlora.apply(fn)
    np.testing.assert_allclose(
        f(params, mixed, x, adapter_ids=np.array([-1, -1])), fn(params, x), **F32
    )
