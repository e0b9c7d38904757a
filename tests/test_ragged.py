"""MoE experts through ``lax.ragged_dot``, factored (``examples/moe.py``'s layer), and dense
expert einsums. Reference: the merged experts (outputs and gradients, fp32 1e-5)."""

import jax
import jax.numpy as jnp
import moe

import jlora
from conftest import check_against_materialized, randomize

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


def test_dora_experts_materialize_and_say_why(key):
    params, adapter, x = _setup(key, dora=True)
    uses = jlora.explain(moe.moe, params, adapter, x)
    assert uses["experts/w_in"] == ["materialized (ragged_dot of DoRA experts)"]
    check_against_materialized(moe.moe, params, adapter, x)


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
