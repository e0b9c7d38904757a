"""MoE experts through ``lax.ragged_dot``, factored (``examples/moe.py``'s layer), and dense
expert einsums. Reference: the merged experts (outputs and gradients, fp32 1e-5)."""

import dataclasses

import jax
import jax.numpy as jnp
import moe
import numpy as np

import jlora
from conftest import check_against_materialized, close, randomize

TARGETS = ("w_in", "w_out")


def _setup(key, dora=False, **sizes):
    params = moe.init_params(key, **sizes)
    x = jax.random.normal(jax.random.fold_in(key, 1), (24, params["router"].shape[0]))
    cfg = jlora.LoraConfig(rank=4, targets=TARGETS, dora=dora)
    return params, randomize(jlora.init(key, params, cfg, moe.moe, x), key), x


def test_ragged_experts_are_factored(key, form):
    """Each weight's low-rank products are two more ragged_dots, or on the CPU one masked
    dense product each (``form``)."""
    params, adapter, x = _setup(key)
    jaxpr = jax.make_jaxpr(jlora.apply(moe.moe))(params, adapter, x).jaxpr
    ragged = sum(e.primitive.name == "ragged_dot_general" for e in jaxpr.eqns)
    assert ragged == len(TARGETS) * (3 if form == "ragged" else 1)
    node = adapter["experts"]["w_in"]
    assert (node.stack_axes, node.in_axes, node.out_axes) == ((0,), (1,), (2,))
    assert node.a.shape == (moe.EXPERTS, moe.DIM, 4)  # one A, B per expert
    assert jlora.explain(moe.moe, params, adapter, x) == {
        "experts/w_in": ["factored"],
        "experts/w_out": ["factored"],
    }
    check_against_materialized(moe.moe, params, adapter, x)


def test_dense_expert_einsums_are_factored(key):
    params, adapter, x = _setup(key)
    xe = jnp.broadcast_to(x[None, :4], (moe.EXPERTS, 4, moe.DIM))
    fn = lambda p, x: jnp.einsum(
        "ech,ehd->ecd",
        jax.nn.gelu(jnp.einsum("ecd,edh->ech", x, p["experts"]["w_in"])),
        p["experts"]["w_out"],
    )
    assert set(sum(jlora.explain(fn, params, adapter, xe).values(), [])) == {"factored"}
    check_against_materialized(fn, params, adapter, xe)


def test_dora_experts_are_factored(key):
    """Each row rescaled by its own expert's ``m / ||W0 + s A B||``: outputs and gradients
    (magnitudes included) equal the merged DoRA experts'."""
    params, adapter, x = _setup(key, dora=True)
    adapter = jax.tree.map(lambda v: v * 1.3, adapter)  # magnitudes away from the norms
    uses = jlora.explain(moe.moe, params, adapter, x)
    assert uses == {"experts/w_in": ["factored"], "experts/w_out": ["factored"]}
    check_against_materialized(moe.moe, params, adapter, x)


def test_dora_experts_dropout_follows_peft(key):
    """PEFT's DoRA with dropout, ``x W0 + (g - 1)(drop(x) W0) + g s (drop(x) A) B``, per
    expert: with ``B = 0`` the output gives ``drop(x) W0`` back (square experts), which is
    ``x / (1 - rate)`` or 0 everywhere; then the formula with that ``drop(x)``, float64."""
    e, d, rate = 3, 6, 0.5
    w = jax.random.normal(key, (e, d, d))
    sizes = jnp.array([5, 0, 7], jnp.int32)
    x = jax.random.normal(jax.random.fold_in(key, 1), (14, d))  # 2 rows past the groups
    fn = lambda p, x: jax.lax.ragged_dot(x, p["w"], sizes)
    cfg = jlora.LoraConfig(rank=2, alpha=2.0, targets=("w",), dora=True, dropout=rate)
    node = jlora.init(key, {"w": w}, cfg, fn, x)["w"]
    node = dataclasses.replace(node, magnitude=node.magnitude * 1.5)  # g = 1.5 when B = 0
    f, rng = jlora.apply(fn), jax.random.key(5)
    group = np.repeat(np.arange(e), np.asarray(sizes))
    wn, xn = np.asarray(w, np.float64), np.asarray(x, np.float64)[: len(group)]
    half = np.asarray(f({"w": w}, {"w": node}, x, lora_rng=rng) - fn({"w": w}, x)) / 0.5
    x_drop = np.stack([np.linalg.solve(wn[g].T, h) for g, h in zip(group, half[: len(group)])])
    kept = np.abs(x_drop) > 1e-3
    close(x_drop[kept], xn[kept] / (1 - rate), dict(rtol=1e-3, atol=0))
    assert 0.3 < kept.mean() < 0.7
    node = dataclasses.replace(node, b=0.3 * jax.random.normal(key, node.b.shape))
    a, b = (np.asarray(v, np.float64) for v in (node.a, node.b))
    merged = wn + node.scale * a @ b
    g = np.asarray(node.magnitude) / np.linalg.norm(merged, axis=1)  # (experts, out)
    ref = np.stack(
        [
            xr @ wn[k] + (g[k] - 1) * (xd @ wn[k]) + g[k] * node.scale * (xd @ a[k] @ b[k])
            for k, xr, xd in zip(group, xn, x_drop)
        ]
    )
    got = f({"w": w}, {"w": node}, x, lora_rng=rng)
    close(got[: len(group)], ref, dict(rtol=1e-4, atol=1e-4))
    assert not np.any(np.asarray(got[len(group) :]))  # (rows past the groups: zeros)


def test_lora_step_flops_below_full_fine_tuning(key):
    """XLA's FLOPs (deterministic): the LoRA gradient step at most 0.75x full fine-tuning
    (measured 0.70x here; the frozen experts' forward and input gradient remain)."""
    params, adapter, x = _setup(key, dim=64, hidden=256)
    x = jnp.tile(x, (20, 1))
    lora = lambda ad: jnp.sum(jnp.square(jlora.apply(moe.moe)(params, ad, x)))
    full = lambda p: jnp.sum(jnp.square(moe.moe(p, x)))
    flops = lambda f, a: jax.jit(jax.grad(f)).lower(a).compile().cost_analysis()["flops"]
    assert flops(lora, adapter) <= 0.75 * flops(full, params)


def test_bf16_experts_within_bf16_rounding_of_the_float32_merge(key, form):
    """bf16 base, adapter and input, either form of the grouped products: within bf16
    rounding of the float32 merged experts (measured 0.8% of the largest output, both
    forms alike; asserted at 3%)."""
    params, adapter, x = _setup(key)
    bf = lambda t: jax.tree.map(lambda v: v.astype(jnp.bfloat16), t)
    got = jax.jit(jlora.apply(moe.moe))(bf(params), bf(adapter), x.astype(jnp.bfloat16))
    want = moe.moe(jlora.merge(params, adapter), x)
    assert got.dtype == jnp.bfloat16
    err = jnp.max(jnp.abs(got.astype(jnp.float32) - want))
    assert err <= 0.03 * jnp.max(jnp.abs(want)), err
