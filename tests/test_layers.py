"""LoRA on some layers of a scanned stack (PEFT's ``layers_to_transform``): only those
layers hold factors, the others run the base alone (a ``cond`` per scan step), and the
numbers equal the unscanned model with a leaf per layer."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import llama
import numpy as np
import pytest

import jlora
from conftest import F32, randomize, sub_jaxprs

LAYERS = (0, 2)
WEIGHTS = (("self_attn", "q_proj"), ("mlp", "down_proj"))


def _both(key, layers=(LAYERS, LAYERS), **cfg_kw):
    """The scanned model (3 layers) with an adapter on ``layers`` (one subset per weight
    of WEIGHTS), and the unscanned model with the same weights and the same factors at
    those layers' leaves."""
    conf = llama.LlamaConfig(scan_layers=True, num_layers=3)
    stacked = llama.init_params(conf, key)
    unstacked = {
        "params": {
            **{k: v for k, v in stacked["params"].items() if k != "layers"},
            **{
                f"layers_{i}": jax.tree.map(lambda v, i=i: v[i], stacked["params"]["layers"])
                for i in range(3)
            },
        }
    }
    cfg = lambda subset: jlora.LoraConfig(
        rank=4, targets=("q_proj", "down_proj"), layers_to_transform=list(subset), **cfg_kw
    )
    ads = [randomize(jlora.init(key, stacked, cfg(subset)), key) for subset in layers]
    ad = ads[0]  # each weight's node from the adapter of its own subset
    for (mod, name), other in zip(WEIGHTS[1:], ads[1:]):
        ad["params"]["layers"][mod][name] = other["params"]["layers"][mod][name]
    one = jlora.init(key, unstacked, cfg(range(3)))
    nodes = jlora._src.adapter.adapter_nodes(ad)
    for (mod, name), subset in zip(WEIGHTS, layers):
        node = nodes[f"params/layers/{mod}/{name}/kernel"]
        assert isinstance(node, jlora._src.adapter.LayersNode) and node.layers == tuple(subset)
        assert node.a.shape[0] == len(subset)  # the other layers hold no factors
        for i in range(3):
            leaf = one["params"][f"layers_{i}"][mod]
            if i not in subset:
                leaf[name] = {"kernel": None}
                continue
            k = subset.index(i)
            mag = None if node.magnitude is None else node.magnitude[k]
            leaf[name]["kernel"] = dataclasses.replace(
                leaf[name]["kernel"], a=node.a[k], b=node.b[k], magnitude=mag
            )
    models = [llama.Llama(llama.LlamaConfig(scan_layers=s, num_layers=3)) for s in (1, 0)]
    return models, (stacked, unstacked), (ad, one)


def _dots(jaxpr) -> int:
    """Products: dot_general, and ``jlora_thin`` (the second low-rank product)."""
    return sum(
        (e.primitive.name in ("dot_general", "jlora_thin"))
        + sum(_dots(sub) for sub in jax.extend.core.jaxprs_in_params(e.params))
        for e in jaxpr.eqns
    )


def _conds_in_scans(jaxpr, found):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            found.append([b.jaxpr for b in eqn.params["branches"]])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _conds_in_scans(sub, found)
    return found


@pytest.mark.parametrize("layers", [(LAYERS, LAYERS), ((0, 2), (1,))], ids=["same", "apart"])
@pytest.mark.parametrize("dora", [False, True])
def test_outputs_and_gradients_equal_the_unscanned_model(key, dora, layers):
    """With DoRA the other layers keep g = 1 without a second norm of the base: one
    ``node_norm`` per weight in the jaxpr, counted by its ``sum W0 * W0`` contraction of
    the full (3, in, out) stack with itself. "apart": the two weights adapt different
    layers (each scan step then runs the low-rank path wherever either is adapted)."""
    (scanned, flat), (stacked, unstacked), (ad, one) = _both(key, layers, dora=dora)
    ids = jax.random.randint(key, (2, 10), 0, 256)
    np.testing.assert_allclose(
        jax.jit(jlora.apply(scanned.apply))(stacked, ad, ids),
        jlora.apply(flat.apply)(unstacked, one, ids),
        **F32,
    )
    loss = lambda m, p: lambda a: jnp.mean(jlora.apply(m.apply)(p, a, ids) ** 2)
    g = jax.jit(jax.grad(loss(scanned, stacked)))(ad)
    h = jax.grad(loss(flat, unstacked))(one)
    tol = dict(rtol=1e-4, atol=1e-6) if dora else F32
    for (mod, name), subset in zip(WEIGHTS, layers):
        gs = g["params"]["layers"][mod][name]["kernel"]
        for k, i in enumerate(subset):
            hs = h["params"][f"layers_{i}"][mod][name]["kernel"]
            np.testing.assert_allclose(gs.a[k], hs.a, **tol)
            np.testing.assert_allclose(gs.b[k], hs.b, **tol)
            if dora:
                np.testing.assert_allclose(gs.magnitude[k], hs.magnitude, **tol)
    if not dora:
        return
    w = stacked["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    jaxpr = jax.make_jaxpr(lambda a: jlora.apply(scanned.apply)(stacked, a, ids))(ad).jaxpr

    def squares(jaxpr):
        n = sum(
            e.primitive.name == "dot_general"
            and all(tuple(v.aval.shape) == tuple(w.shape) for v in e.invars)
            for e in jaxpr.eqns
        )
        return n + sum(squares(sub) for e in jaxpr.eqns for sub in sub_jaxprs(e.params))

    assert squares(jaxpr) == 1  # q_proj's norm once (down_proj's has another shape)


def test_the_other_layers_run_no_low_rank_work(key):
    """Each scan step branches: the adapted branch has the 2 x 2 low-rank dots more."""
    (scanned, _), (stacked, _), (ad, _) = _both(key)
    ids = jnp.zeros((1, 4), jnp.int32)
    jaxpr = jax.make_jaxpr(jlora.apply(scanned.apply))(stacked, ad, ids).jaxpr
    (branches,) = _conds_in_scans(jaxpr, [])
    plain, adapted = sorted(branches, key=_dots)
    assert _dots(adapted) - _dots(plain) == 4
    assert jlora.explain(scanned.apply, stacked, ad, ids) == {
        "params/layers/self_attn/q_proj/kernel": ["factored"],
        "params/layers/mlp/down_proj/kernel": ["factored"],
    }


@pytest.mark.parametrize("dora", [False, True])
def test_merge_save_and_load(key, tmp_path, dora):
    (scanned, _), (stacked, _), (ad, _) = _both(key, dora=dora)
    ids = jax.random.randint(key, (2, 10), 0, 256)
    merged = jlora.merge(stacked, ad)
    np.testing.assert_allclose(
        scanned.apply(merged, ids), jlora.apply(scanned.apply)(stacked, ad, ids), **F32
    )
    w0 = stacked["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    w = merged["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_allclose(w[1], w0[1], rtol=1e-6, atol=0)  # layer 1 keeps W0
    assert not np.allclose(w[0], w0[0])
    jlora.save_adapter(tmp_path / "ad", ad)
    mine = jlora._src.adapter.adapter_nodes(ad)
    back = jlora._src.adapter.adapter_nodes(jlora.load_adapter(tmp_path / "ad"))
    assert back.keys() == mine.keys()
    for p, node in mine.items():
        assert jax.tree.structure(back[p]) == jax.tree.structure(node)  # settings too
        for x, y in zip(jax.tree.leaves(node), jax.tree.leaves(back[p])):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dora", [False, True])
def test_a_peft_file_onto_an_nf4_stack(key, tmp_path, dora):
    """A PEFT file with ``layers_to_transform`` loaded onto an NF4-quantized scanned base
    (init refuses an NF4 stack in part; quantizing after init or loading is the way) trains
    as the adapter on the dequantized base."""
    (scanned, _), (stacked, _), (ad, _) = _both(key, dora=dora)
    q = jlora.quantize(stacked, compute_dtype=jnp.float32)
    deq = jlora.dequantize(q)
    jlora.peft.save(str(tmp_path), ad)
    back = jlora.peft.load(str(tmp_path), q)
    assert isinstance(
        jlora._src.adapter.adapter_nodes(back)["params/layers/self_attn/q_proj/kernel"],
        jlora._src.adapter.LayersNode,
    )
    ids = jax.random.randint(key, (2, 10), 0, 256)
    f = jax.jit(jlora.apply(scanned.apply))
    np.testing.assert_allclose(f(q, back, ids), f(deq, ad, ids), **F32)
    grads = [jax.grad(lambda a, p=p: f(p, a, ids).sum())(a) for p, a in ((q, back), (deq, ad))]
    for g1, g2 in zip(*map(jax.tree.leaves, grads), strict=True):
        np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5)
    assert set(sum(jlora.explain(scanned.apply, q, back, ids).values(), [])) == {"factored"}


def test_errors(key):
    params = {"params": {"layers": {k: {"kernel": jnp.ones((4, 8, 8))} for k in ("q", "v")}}}
    cfg = lambda **kw: jlora.LoraConfig(rank=2, targets=("q",), **kw)
    with pytest.raises(ValueError, match="stacks 4 layers.*below 4"):
        jlora.init(key, params, cfg(layers_to_transform=[1, 4]))
    ad = jlora.init(key, params, cfg(layers_to_transform=[1, 3]))
    with pytest.raises(ValueError, match="some layers of a stack"):
        jlora.stack([ad, ad])
    with pytest.raises(ValueError, match="NF4 in part"):
        jlora.init(
            key, jlora.quantize(params, compute_dtype=jnp.float32), cfg(layers_to_transform=[1])
        )
    for bad in (
        dict(layers_to_transform=[-1]),
        dict(layers_to_transform=[]),
        dict(layers_to_transform="0"),
        dict(layers_pattern=""),
    ):
        with pytest.raises(ValueError, match="layers_"):
            jlora.LoraConfig(**bad)
