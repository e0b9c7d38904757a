"""Fused and scaled kernels stay factored: ``split`` of a fused qkv/gate_up kernel along
its out or in axis, and a kernel scaled before use by a scalar (literal or traced) or by a
per-feature scale along its in, out or stacked axes.
Reference: the same function on the merged weight, outputs and gradients (fp32 1e-5)."""

import jax
import jax.numpy as jnp
import pytest

import jlora
from conftest import check_against_materialized, randomize

FNS = {
    "split_out": lambda p, x: sum(jnp.tanh(x @ w) for w in jnp.split(p["qkv"], 3, axis=1)),
    "split_in": lambda p, x: sum(x[:, :8] @ w for w in jnp.split(p["qkv"], 2, axis=0)),
    "uneven": lambda p, x: jnp.concatenate(
        [x @ w for w in jnp.split(p["qkv"], [4, 20], axis=1)], axis=1
    ),
    "scaled": lambda p, x: x @ (p["qkv"] * 0.5) + x @ (3.0 * p["qkv"]),
    "divided_by_a_traced_scale": lambda p, x: x @ (p["qkv"] / p["scale"]),
}


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("case", sorted(FNS))
def test_fused_and_scaled_kernels_are_factored(key, case, dora):
    params = {"qkv": jax.random.normal(key, (16, 24)), "scale": jnp.float32(0.5)}
    x = jax.random.normal(jax.random.fold_in(key, 1), (3, 16))
    cfg = jlora.LoraConfig(rank=4, targets=("qkv",), dora=dora)
    adapter = randomize(jlora.init(key, params, cfg, FNS[case], x), key)
    uses = jlora.explain(FNS[case], params, adapter, x)["qkv"]
    assert uses and set(uses) == {"factored"}
    check_against_materialized(FNS[case], params, adapter, x)


SCALES = {  # (fn, kernel shape): a scale along out, in or stacked axes folds into A or B
    "out": (lambda p, x: x @ (p["w"] * jnp.arange(24.0)[None, :]), (16, 24)),
    "in": (lambda p, x: x @ (p["w"] / (1.0 + jnp.arange(16.0))[:, None]), (16, 24)),
    "out_traced": (lambda p, x: x @ (p["s"] * p["w"]), (16, 24)),
    "stacked_and_out": (
        lambda p, x: jnp.einsum(
            "bi,lio->lbo",
            x,
            p["w"] * jnp.arange(1.0, 25.0)[None, None, :] * jnp.arange(1.0, 3.0)[:, None, None],
        ),
        (2, 16, 24),
    ),
    "stacked_in": (
        lambda p, x: jax.lax.scan(
            lambda c, w: (c, x @ w), 0.0, p["w"] * jnp.arange(1.0, 17.0)[None, :, None]
        )[1],
        (2, 16, 24),
    ),
}


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("case", sorted(SCALES))
def test_per_feature_scales_are_factored(key, case, dora):
    fn, shape = SCALES[case]
    params = {"w": jax.random.normal(key, shape), "s": jnp.linspace(0.5, 2.0, 24)[None, :]}
    x = jax.random.normal(jax.random.fold_in(key, 1), (3, 16))
    cfg = jlora.LoraConfig(rank=4, targets=("w",), dora=dora)
    adapter = randomize(jlora.init(key, params, cfg, fn, x), key)
    assert jlora.explain(fn, params, adapter, x) == {"w": ["factored"]}
    check_against_materialized(fn, params, adapter, x)


def test_a_scale_along_in_and_out_axes_materializes_and_says_so(key):
    params = {"w": jax.random.normal(key, (16, 24))}
    fn = lambda p, x: x @ (p["w"] * jnp.arange(16.0 * 24).reshape(16, 24))
    x = jax.random.normal(key, (3, 16))
    adapter = randomize(jlora.init(key, params, jlora.LoraConfig(rank=4, targets=("w",))), key)
    assert jlora.explain(fn, params, adapter, x) == {"w": ["materialized (mul)"]}
    check_against_materialized(fn, params, adapter, x)


def _two_adapters(key, params, fn, x, dora=False):
    """q and k adapted with different ranks and alphas (scales fold into the fused B)."""
    cfgs = [
        jlora.LoraConfig(rank=2, alpha=3.0, targets=("q",), dora=dora),
        jlora.LoraConfig(rank=3, alpha=5.0, targets=("k",), dora=dora),
    ]
    ads = [jlora.init(key, params, c, fn, x) for c in cfgs]
    pick = lambda a, b: a if a is not None else b
    merged = jax.tree.map(pick, *ads, is_leaf=lambda z: z is None or jlora._src.adapter.is_node(z))
    return randomize(merged, key)


CONCATS = {
    "out": (
        lambda p, x: x @ jnp.concatenate([p["q"], p["k"], p["v"]], axis=1),
        {"q": (16, 8), "k": (16, 4), "v": (16, 8)},
        (3, 16),
    ),
    "in": (
        lambda p, x: (
            jnp.concatenate([x, x[:, :4]], axis=1) @ jnp.concatenate([p["q"], p["k"]], axis=0)
        ),
        {"q": (16, 8), "k": (4, 8)},
        (3, 16),
    ),
    "stacked": (
        lambda p, x: x @ jnp.concatenate([p["q"], p["k"]], axis=2)[1],
        {"q": (2, 16, 8), "k": (2, 16, 4)},
        (3, 16),
    ),
}


@pytest.mark.parametrize("case", sorted(CONCATS))
def test_concatenated_kernels_are_one_factored_weight(key, case):
    fn, shapes, x_shape = CONCATS[case]
    params = {
        k: jax.random.normal(jax.random.fold_in(key, i), s)
        for i, (k, s) in enumerate(shapes.items())
    }
    x = jax.random.normal(key, x_shape)
    adapter = _two_adapters(key, params, fn, x)
    assert jlora.explain(fn, params, adapter, x) == {"k": ["factored"], "q": ["factored"]}
    check_against_materialized(fn, params, adapter, x)


def test_concatenated_dora_kernels_materialize(key):
    fn, shapes, x_shape = CONCATS["out"]
    params = {
        k: jax.random.normal(jax.random.fold_in(key, i), s)
        for i, (k, s) in enumerate(shapes.items())
    }
    x = jax.random.normal(key, x_shape)
    adapter = _two_adapters(key, params, fn, x, dora=True)
    assert jlora.explain(fn, params, adapter, x) == {
        "k": ["materialized (concatenate)"],
        "q": ["materialized (concatenate)"],
    }
    check_against_materialized(fn, params, adapter, x)
