"""The grouped path of mixed-adapter batches (rows sorted by adapter, ``ragged_dot``):
exact against each adapter run alone, gradients equal to the per-example path's."""

import jax
import jax.extend
import jax.numpy as jnp
import llama
import numpy as np
import pytest
from test_multi import _setup

import jlora
from conftest import F32, randomize


def _prims(f, *args, **kw) -> set:
    """Every primitive name in ``f``'s jaxpr, nested jaxprs included."""
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(lambda *a: f(*a, **kw))(*args).jaxpr)
    return names


def _ragged(names) -> bool:
    return any(n.startswith("ragged_dot") for n in names)


def _grouped(names) -> bool:
    """The grouped path sorts the rows by adapter (the per-example path sorts nothing)."""
    return "sort" in names


def test_every_layout_equals_each_adapter_alone(key, form):
    """Two in axes and two out axes, examples on x's axis 1, the weight on either side."""
    p = {"w": jax.random.normal(key, (3, 4, 5, 2))}  # (in, in, out, out)
    cfg = jlora.LoraConfig(rank=3, targets=("w",))
    fn = lambda p, x: jnp.einsum("tbij,ijkl->btkl", x, p["w"])  # examples: x axis 1
    fn_t = lambda p, x: jnp.einsum("ijkl,tbij->kltb", p["w"], x)  # weight on the left
    init = lambda i: randomize(
        jlora.init(jax.random.fold_in(key, i), p, cfg, fn, jnp.ones((2, 1, 3, 4))),
        jax.random.fold_in(key, 5 + i),
    )
    ads = [init(i) for i in range(3)]
    x = jax.random.normal(key, (2, 6, 3, 4))
    aid = jnp.array([2, 0, -1, 1, 0, 2])
    for f, ex in ((fn, 0), (fn_t, 3)):
        run = jlora.apply(f, mixed="grouped")
        got = jax.jit(lambda st, x: run(p, st, x, adapter_ids=aid, example_axes=1))(
            jlora.stack(ads), x
        )
        names = _prims(
            jlora.apply(f, mixed="grouped"), p, jlora.stack(ads), x, adapter_ids=aid, example_axes=1
        )
        assert _grouped(names) and _ragged(names) == (form == "ragged")
        for i, a in enumerate(aid.tolist()):
            alone = f(p, x[:, i : i + 1]) if a < 0 else jlora.apply(f)(p, ads[a], x[:, i : i + 1])
            np.testing.assert_allclose(jnp.take(got, i, ex), jnp.take(alone, 0, ex), **F32)


@pytest.mark.parametrize("scan", [True, False])
def test_llama_mixed_batch_and_gradients_match_the_gather_path(key, scan, form):
    model, params, ids, ads = _setup(key, scan)
    aid = jnp.array([2, 0, -1, 1, 0])
    st = jlora.stack(ads)
    paths = {m: jlora.apply(model.apply, mixed=m) for m in ("gather", "grouped", "onehot")}
    names = _prims(paths["grouped"], params, st, ids, adapter_ids=aid)
    assert _grouped(names) and _ragged(names) == (form == "ragged")
    assert not _grouped(_prims(paths["gather"], params, st, ids, adapter_ids=aid))
    out = {m: jax.jit(f)(params, st, ids, adapter_ids=aid) for m, f in paths.items()}
    np.testing.assert_allclose(out["grouped"], out["gather"], **F32)
    np.testing.assert_allclose(out["onehot"], out["gather"], **F32)
    alone = jlora.apply(model.apply)(params, ads[1], ids[3:4])
    np.testing.assert_allclose(out["grouped"][3], alone[0], **F32)
    np.testing.assert_allclose(out["onehot"][3], alone[0], **F32)
    assert not _grouped(_prims(paths["onehot"], params, st, ids, adapter_ids=aid))  # no sort

    def loss(f):
        return lambda ad: jnp.mean(f(params, ad, ids, adapter_ids=aid) ** 2)

    grads = {m: jax.jit(jax.grad(loss(f)))(st) for m, f in paths.items()}
    for m in ("grouped", "onehot"):
        for g, h in zip(jax.tree.leaves(grads[m]), jax.tree.leaves(grads["gather"])):
            scale = float(jnp.max(jnp.abs(h)))
            np.testing.assert_allclose(g / scale, h / scale, rtol=0, atol=1e-5)


def test_dora_and_auto_on_cpu_take_the_gather_path(key):
    model, params, ids, ads = _setup(key, True, dora=True)
    aid = jnp.array([2, 0, -1, 1, 0])
    st = jlora.stack(ads)
    run = jlora.apply(model.apply, mixed="grouped")
    assert not _grouped(_prims(run, params, st, ids, adapter_ids=aid))
    np.testing.assert_allclose(
        run(params, st, ids, adapter_ids=aid),
        jlora.apply(model.apply)(params, st, ids, adapter_ids=aid),
        **F32,
    )
    _, params, ids, ads = _setup(key, True)
    auto = jlora.apply(model.apply)
    assert jax.default_backend() == "cpu"
    assert not _grouped(
        _prims(auto, params, jlora.stack(ads), ids[:, :1], adapter_ids=aid)
    )  # decode-shaped, but grouping is slow here
    with pytest.raises(ValueError, match=r"mixed='sorted'.*'grouped'"):
        jlora.apply(model.apply, mixed="sorted")


def test_explain_names_the_path_of_a_mixed_batch(key):
    """``explain`` takes apply's mixed-batch arguments and says, per use, which path runs
    (gathered factors, or rows grouped by adapter)."""
    from jlora._src.interpret.uses import GATHERED, GROUPED, ONEHOT, RANKED

    model, params, ids, ads = _setup(key, True)
    aid, st = jnp.array([2, 0, -1, 1, 0]), jlora.stack(ads)
    said = lambda **kw: {
        u
        for uses in jlora.explain(model.apply, params, st, ids, adapter_ids=aid, **kw).values()
        for u in uses
    }
    assert said(mixed="grouped") == {"factored" + GROUPED}
    assert said(mixed="onehot") == {"factored" + ONEHOT}
    # ids known when traced, adapters of several ranks: each rank class at its own rank
    assert said(mixed="gather") == said() == {"factored" + RANKED}
    traced = jax.ShapeDtypeStruct(aid.shape, aid.dtype)  # ids known only when it runs
    assert {
        u
        for uses in jlora.explain(model.apply, params, st, ids, adapter_ids=traced).values()
        for u in uses
    } == {"factored" + GATHERED}  # auto on a CPU
    assert jlora.explain(model.apply, params, ads[0], ids) == jlora.explain(
        model.apply, params, ads[0], ids, mixed="grouped"
    )  # one adapter: no mixed path
    dora_st = jlora.stack(_setup(key, True, dora=True)[3])
    assert {
        u
        for uses in jlora.explain(
            model.apply, params, dora_st, ids, adapter_ids=aid, mixed="grouped"
        ).values()
        for u in uses
    } == {"factored" + GATHERED}
    with pytest.raises(ValueError, match=r"explain\(mixed='sorted'\)"):
        jlora.explain(model.apply, params, st, ids, adapter_ids=aid, mixed="sorted")


def test_a_transposed_use_is_gathered_and_says_so(key):
    """``x @ W.T`` against the adapter's layout (A and B swap roles): the grouped path does
    not take it, so every mixed path gathers, ``explain`` says both, and each row equals
    its adapter alone (-1: the base)."""
    from jlora._src.interpret.uses import GATHERED, TRANSPOSED

    params = {"w": jax.random.normal(key, (6, 5))}
    fn = lambda p, x: jnp.tanh(x @ p["w"].T)
    x = jax.random.normal(jax.random.key(1), (3, 4, 5))
    ads = [
        randomize(
            jlora.init(jax.random.key(i), params, jlora.LoraConfig(rank=2, targets=("w",))),
            jax.random.key(i + 5),
        )
        for i in range(2)
    ]
    st, aid = jlora.stack(ads), jnp.array([1, 0, -1])
    for mixed in ("gather", "grouped"):
        assert jlora.explain(fn, params, st, x, adapter_ids=aid, mixed=mixed) == {
            "w": [TRANSPOSED + GATHERED]
        }
        out = jlora.apply(fn, mixed=mixed)(params, st, x, adapter_ids=aid)
        for row, (a, ad) in enumerate(zip(aid, [ads[1], ads[0], None])):
            want = fn(params, x) if ad is None else jlora.apply(fn)(params, ad, x)
            np.testing.assert_allclose(out[row], want[row], **F32)


def test_example_model_decodes_with_the_grouped_path(key):
    """One cached decode step: the example axis is axis 1 of the cache (example_axes)."""
    model, params, ids, ads = _setup(key, True)
    cfg = model.config
    aid = jnp.array([2, 0, -1, 1, 0])
    st = jlora.stack(ads)
    cache = llama.init_cache(cfg, ids.shape[0], 16)
    args = dict(adapter_ids=aid, example_axes=(0, 1))
    outs = {}
    for m in ("gather", "grouped"):
        f = jlora.apply(lambda p, t, c: model.apply(p, t, cache=c, cache_index=0), mixed=m)
        outs[m] = jax.jit(lambda st, t, c: f(params, st, t, c, **args))(st, ids[:, :1], cache)
    for g, h in zip(jax.tree.leaves(outs["grouped"]), jax.tree.leaves(outs["gather"])):
        np.testing.assert_allclose(g, h, **F32)
