"""Fused and scaled kernels stay factored: ``split`` of a fused qkv/gate_up kernel along
its out or in axis, and a kernel scaled by a scalar before use (literal or traced).
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
        [x @ w for w in jnp.split(p["qkv"], [4, 20], axis=1)], axis=1),
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


def test_a_per_feature_scale_materializes_and_says_so(key):
    params = {"w": jax.random.normal(key, (16, 24))}
    fn = lambda p, x: x @ (p["w"] * jnp.arange(24.0)[None, :])
    x = jax.random.normal(key, (3, 16))
    adapter = randomize(jlora.init(key, params, jlora.LoraConfig(rank=4, targets=("w",))), key)
    assert jlora.explain(fn, params, adapter, x) == {"w": ["materialized (mul)"]}
    check_against_materialized(fn, params, adapter, x)
