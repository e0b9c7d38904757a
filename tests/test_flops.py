"""XLA cost_analysis FLOPs prove the factored path runs: no full-size weight gradient."""

import jax
import pytest

import jlora
import llama

RANK, BATCH, SEQ = 16, 2, 64


def _flops(f, *args) -> float:
    return jax.jit(f).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("dora", [False, True])
def test_lora_step_flops_below_full_finetuning_and_merge_on_the_fly_above(scan, dora):
    """XLA counts a loop body once, so the unscanned model gives the true totals."""
    cfg = llama.LlamaConfig.named("bench", scan_layers=scan)
    model = llama.Llama(cfg)
    key = jax.random.key(0)
    ids = jax.random.randint(key, (BATCH, SEQ + 1), 0, cfg.vocab_size)
    params = llama.init_params(cfg, key)
    adapter = jlora.init(key, params, jlora.LoraConfig.preset("complex", rank=RANK,
                                                              alpha=2.0 * RANK, dora=dora))
    full = lambda p: llama.loss_fn(model.apply(p, ids[:, :-1]), ids[:, 1:])
    lora = lambda ad: llama.loss_fn(jlora.apply(model.apply)(params, ad, ids[:, :-1]),
                                    ids[:, 1:])
    merge_on_the_fly = lambda ad: full(jlora.merge(params, ad))

    full_flops = _flops(jax.grad(full), params)
    lora_ratio = _flops(jax.grad(lora), adapter) / full_flops
    naive_ratio = _flops(jax.grad(merge_on_the_fly), adapter) / full_flops
    assert set(sum(jlora.explain(model.apply, params, adapter, ids).values(), [])) == {"factored"}
    # physical floor ~0.67: forward + input gradient; DoRA adds its norms and scalings
    assert lora_ratio <= (0.8 if dora else 0.75), lora_ratio
    assert naive_ratio > 1.0, naive_ratio  # a full-size weight gradient per target
