"""lorax (jax-lorax 0.3.1) for ``peers.py``; needs its own venv with JAX 0.4.23
(``benchmarks/setup_lorax.sh``): it imports ``jax.linear_util``, gone from newer JAX."""

import jax
import jax.numpy as jnp
import llama
import lorax
import optax
from peers import LR, RANK, TARGETS, base_params, batch, config, timed  # noqa: I001


def run(repeats: int) -> dict:
    cfg, params = config(), base_params()
    model = llama.Llama(cfg)
    ids = jnp.asarray(batch())
    x, y = ids[:, :-1], ids[:, 1:]
    target = lambda path: path.split("/")[-2] in TARGETS  # lorax passes "a/b/c" strings
    spec = lorax.simple_spec(
        params,
        decision_fn=lambda path, arr: RANK if target(path) else lorax.LORA_FREEZE,
        tune_vectors=False,
    )
    frozen, tune = lorax.init_lora(params, spec, jax.random.PRNGKey(1))
    lora_apply = lorax.lora(model.apply)
    tx, full_tx = optax.adamw(LR), optax.adamw(LR)

    @jax.jit
    def lora_step(tune, opt, frozen):  # only the LoRA factors are trained
        g = jax.grad(lambda t: llama.loss_fn(lora_apply((frozen, t), x), y))(tune)
        u, opt = tx.update(g, opt, tune)
        return optax.apply_updates(tune, u), opt

    @jax.jit
    def full_step(p, opt):
        g = jax.grad(lambda q: llama.loss_fn(model.apply(q, x), y))(p)
        u, opt = full_tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt

    state = {"lora": (tune, tx.init(tune)), "full": (params, full_tx.init(params))}

    def stepper(name, f, *rest):
        def go():
            state[name] = jax.block_until_ready(f(*state[name], *rest))

        return go

    fwd, lfwd = jax.jit(model.apply), jax.jit(lora_apply)
    merged = lorax.merge_params(frozen, tune, destructive=False)
    block = jax.block_until_ready
    calls = dict(
        base_forward=lambda: block(fwd(params, x)),
        lora_forward=lambda: block(lfwd((frozen, tune), x)),
        merged_forward=lambda: block(fwd(merged, x)),
        lora_step=stepper("lora", lora_step, frozen),
        full_step=stepper("full", full_step),
    )
    return timed(calls, repeats)
