"""Every init starts where the base is: the adapted model at init equals the base model.

Inits whose ``B`` is zero do so exactly; ``orthogonal`` through factors whose product is
zero; PiSSA (full and randomized), OLoRA, LoRA-GA and CorDA through the residual base
they return. LoftQ
starts at its quantized approximation instead (the point of it), checked against that.
"""

import jax
import jax.numpy as jnp
import llama
import numpy as np
import pytest

import jlora

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INITS = [
    "kaiming",
    "gaussian",
    "orthogonal",
    "pissa",
    "pissa_niter_2",
    "olora",
    "eva",
    "lora_ga",
    "corda",
]


def _model(scan: bool):
    cfg = llama.LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        scan_layers=scan,
    )
    model = llama.Llama(cfg)
    return model, llama.init_params(cfg, jax.random.key(0))


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("init", INITS)
def test_the_adapted_model_at_init_is_the_base(init, scan):
    model, params = _model(scan)
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 32)
    key = jax.random.key(2)
    if init == "eva":
        cfg = jlora.LoraConfig(rank=4, targets=PROJ)
        ad, base = jlora.init_eva(key, params, cfg, model.apply, [ids], rho=1.0), params
    elif init in ("lora_ga", "corda"):
        cfg = jlora.LoraConfig(rank=4, targets=PROJ, init=init)
        ad, base = jlora.init_from_data(
            key, params, cfg, model.apply, [ids, ids + 1], loss=lambda logits: jnp.mean(logits**2)
        )
    else:
        cfg = jlora.LoraConfig(rank=4, targets=PROJ, init=init)
        ad, base = jlora.init_with_base(key, params, cfg, model.apply, ids)
    nodes = jlora._src.adapter.adapter_nodes(ad).values()
    if init not in ("kaiming", "gaussian", "eva"):  # these have B = 0; the others do not
        assert min(float(jnp.abs(n.b).max()) for n in nodes) > 1e-6
    want = model.apply(params, ids)
    got = jax.jit(jlora.apply(model.apply))(base, ad, ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_loftq_starts_at_its_quantized_approximation():
    """LoftQ's base is NF4: the model at init is ``dequant(Q) + s A B``, closer to the
    float model than the NF4 base alone."""
    model, params = _model(True)
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 32)
    cfg = jlora.LoraConfig(rank=4, targets=PROJ, init="loftq")
    ad, base = jlora.init_with_base(jax.random.key(2), params, cfg, model.apply, ids)
    want = model.apply(params, ids)
    err = lambda out: float(jnp.abs(out - want).max())
    plain = jlora.quantize(params, PROJ)
    assert err(jlora.apply(model.apply)(base, ad, ids)) < err(
        model.apply(jlora.dequantize(plain), ids)
    )


def test_orthogonal_needs_an_even_rank():
    with pytest.raises(jlora.LoraError, match="even rank"):
        jlora.init(
            jax.random.key(0),
            {"w": jnp.ones((8, 8))},
            jlora.LoraConfig(rank=3, targets="w", init="orthogonal"),
        )
    with pytest.raises(jlora.LoraError, match="pissa_niter_<K>"):
        jlora.LoraConfig(targets="w", init="pissa_niter_x")
