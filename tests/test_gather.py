"""Embedding lookups of an adapted table, factored: ``E0[ids] + s * A[ids] @ B``.

Reference: the same function on the merged table (``check_against_materialized``:
outputs and adapter gradients, fp32 1e-5)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import llama
import numpy as np
import pytest
from flax import nnx

import jlora
from conftest import check_against_materialized, float_shapes, randomize, ref_merge
from jlora._src.interpret.uses import TRANSPOSED_LEARNED

V, D = 50, 16
IDS = jnp.array([[1, 2, 3], [49, 0, 7]])


class LinenEmbed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Embed(V, D, name="embed")(ids)


def _nnx_embed(key):
    graphdef, state = nnx.split(nnx.Embed(V, D, rngs=nnx.Rngs(0)))
    params = {"embed": {"embedding": state["embedding"][...]}}

    def fn(p, ids):
        st = jax.tree.map(lambda _: p["embed"]["embedding"], state)
        return nnx.merge(graphdef, st)(ids)

    return params, fn


def _cases(key):
    table = {"embed": {"embedding": jax.random.normal(key, (V, D))}}
    linen = LinenEmbed().init(key, IDS)
    return {
        "take": (table, lambda p, i: jnp.take(p["embed"]["embedding"], i, axis=0)),
        "index": (table, lambda p, i: p["embed"]["embedding"][i]),
        "clip": (table, lambda p, i: p["embed"]["embedding"].at[i].get(mode="clip")),
        "linen": (linen, LinenEmbed().apply),
        "nnx": _nnx_embed(key),
    }


@pytest.mark.parametrize("case", ["take", "index", "clip", "linen", "nnx"])
def test_lookups_are_factored(key, case):
    params, fn = _cases(key)[case]
    cfg = jlora.LoraConfig(rank=4, targets=("embed",))
    adapter = randomize(jlora.init(key, params, cfg, fn, IDS), key)
    (node,) = jlora._src.adapter.adapter_nodes(adapter).values()
    assert (node.in_axes, node.out_axes, node.a.shape, node.b.shape) == ((0,), (1,), (V, 4), (4, D))
    assert set(sum(jlora.explain(fn, params, adapter, IDS).values(), [])) == {"factored"}
    check_against_materialized(fn, params, adapter, IDS)


def test_a_tied_table_is_factored_at_both_sites(key):
    """Lookup and ``x @ E.T``: the lookup decides the axes (vocab "in", as PEFT); explain
    calls the decode use transposed without advising to learn axes already learned."""
    params = {"embed": jax.random.normal(key, (V, D))}
    fn = lambda p, ids: jnp.tanh(p["embed"][ids]) @ p["embed"].T
    adapter = randomize(
        jlora.init(key, params, jlora.LoraConfig(rank=4, targets=("embed",)), fn, IDS), key
    )
    assert adapter["embed"].in_axes == (0,)
    assert jlora.explain(fn, params, adapter, IDS) == {"embed": ["factored", TRANSPOSED_LEARNED]}
    check_against_materialized(fn, params, adapter, IDS)


def test_no_table_sized_array_in_the_train_step(key):
    """The frozen table is only ever an input: no equation of the LoRA step (forward and
    backward, with LoRA on the embedding and on the as large lm_head) outputs a float
    array of its size."""
    cfg = llama.LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2
    )
    model = llama.Llama(cfg)
    params = llama.init_params(cfg, key)
    ids = jax.random.randint(key, (2, 9), 0, cfg.vocab_size)
    lcfg = jlora.LoraConfig(rank=4, targets=("embed_tokens", "lm_head", "q_proj", "v_proj"))
    adapter = randomize(jlora.init(key, params, lcfg, model.apply, ids[:, :-1]), key)
    loss = lambda ad: llama.loss_fn(jlora.apply(model.apply)(params, ad, ids[:, :-1]), ids[:, 1:])
    uses = jlora.explain(model.apply, params, adapter, ids[:, :-1])
    assert set(sum(uses.values(), [])) == {"factored"}
    table = cfg.vocab_size * cfg.hidden_size
    shapes = [s for s, _ in float_shapes(jax.make_jaxpr(jax.grad(loss))(adapter).jaxpr)]
    assert not [s for s in shapes if np.prod(s) >= table]
    ref = lambda ad: llama.loss_fn(model.apply(jlora.merge(params, ad), ids[:, :-1]), ids[:, 1:])
    for g, r in zip(
        jax.tree.leaves(jax.jit(jax.grad(loss))(adapter)), jax.tree.leaves(jax.grad(ref)(adapter))
    ):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["take", "linen", "nnx"])
def test_dora_lookups_are_factored(key, case):
    """DoRA on a table (PEFT's ``DoraEmbeddingLayer``): each embedding feature scaled by
    ``m / ||E0 + s A B||``, the norm over the vocabulary; checked against the merged table."""
    params, fn = _cases(key)[case]
    cfg = jlora.LoraConfig(rank=4, targets=("embed",), dora=True)
    adapter = randomize(jlora.init(key, params, cfg, fn, IDS), key)
    (node,) = jlora._src.adapter.adapter_nodes(adapter).values()
    assert node.magnitude.shape == (D,)
    assert set(sum(jlora.explain(fn, params, adapter, IDS).values(), [])) == {"factored"}
    check_against_materialized(fn, params, adapter, IDS)


PICKS = {  # a (layers, in, out) kernel: layers picked by take/gather, any index shape
    "scalar": lambda p, x: x @ jnp.take(p["w"], 1, axis=0),
    "traced": lambda p, x: x @ jnp.take(p["w"], p["i"], axis=0),
    "vector": lambda p, x: jnp.einsum(
        "bi,lio->lbo", x, jnp.take(p["w"], jnp.array([2, 0]), axis=0)
    ),
    "clip_out_of_range": lambda p, x: x @ jnp.take(p["w"], 5, axis=0, mode="clip"),
    "nan_fill_out_of_range": lambda p, x: x @ jnp.take(p["w"], 5, axis=0),
    "zero_fill_out_of_range": lambda p, x: (
        x @ jnp.take(p["w"], 5, axis=0, mode="fill", fill_value=0)
    ),
}


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("case", sorted(PICKS))
def test_layers_picked_by_gather_stay_factored(key, case, dora):
    params = {"w": jax.random.normal(key, (3, 16, 24)), "i": jnp.int32(2)}
    x = jax.random.normal(key, (3, 16))
    cfg = jlora.LoraConfig(rank=4, targets=("w",), dora=dora)
    adapter = randomize(jlora.init(key, params, cfg, PICKS[case], x), key)
    node = jlora._src.adapter.adapter_nodes(adapter)["w"]
    assert (node.stack_axes, node.in_axes, node.out_axes) == ((0,), (1,), (2,))
    assert jlora.explain(PICKS[case], params, adapter, x) == {"w": ["factored"]}
    if "out_of_range" in case:  # base and factors filled alike: NaN or zero everywhere
        got = jlora.apply(PICKS[case])(params, adapter, x)
        want = PICKS[case](ref_merge(params, adapter), x)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    check_against_materialized(PICKS[case], params, adapter, x)


def test_a_pick_with_another_fill_value_materializes_and_says_why(key):
    """Filled with 1, the merged weight is 1 but base + s A B would be 1 + s r: refused."""
    params = {"w": jax.random.normal(key, (3, 16, 24))}
    fn = lambda p, x: x @ jnp.take(p["w"], 5, axis=0, mode="fill", fill_value=1.0)
    x = jax.random.normal(key, (3, 16))
    cfg = jlora.LoraConfig(rank=4, targets=("w",))
    adapter = randomize(jlora.init(key, params, cfg, PICKS["scalar"], x), key)
    (use,) = jlora.explain(fn, params, adapter, x)["w"]
    assert use.startswith("materialized (gather of stacked slices") and "other than 0" in use
    check_against_materialized(fn, params, adapter, x)


@pytest.mark.parametrize(
    "what, why",
    [
        ("column", "gather along the table's out axis"),
        ("window", "gather that is not a row lookup"),
    ],
)
def test_other_gathers_are_materialized_and_say_why(key, what, why):
    params = {"embed": jax.random.normal(key, (V, D))}
    fn = {"column": lambda p, i: p["embed"][:, i[0]], "window": lambda p, i: p["embed"][i, i % D]}[
        what
    ]  # single elements
    cfg = jlora.LoraConfig(rank=4, targets=("embed",))
    adapter = randomize(jlora.init(key, params, cfg), key)
    assert f"materialized ({why})" in jlora.explain(fn, params, adapter, IDS)["embed"]
    check_against_materialized(fn, params, adapter, IDS)


def test_a_three_axis_table_looked_up_by_whole_rows_learns_the_row_axis_as_in(key):
    """(vocab, heads, head_dim) read by ``table[ids]``: whole slices along axis 0 that no dot
    contracts afterwards are rows of a table (vocab "in"), not layers of a stack."""
    params = {"embed": jax.random.normal(key, (V, 2, 8))}
    fn = lambda p, i: p["embed"][i]
    adapter = randomize(
        jlora.init(key, params, jlora.LoraConfig(rank=4, targets=("embed",)), fn, IDS), key
    )
    node = adapter["embed"]
    assert (node.stack_axes, node.in_axes, node.out_axes) == ((), (0,), (1, 2))
    check_against_materialized(fn, params, adapter, IDS)
