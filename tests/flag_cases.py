"""Child script: jlora under one of JAX's opt-in flags (``python flag_cases.py FLAG``).

Checks, on the example Llama (tiny, remat layers, LoRA "general"; float and NF4
base): every use stays factored; on a custom_vjp function that receives an adapted weight,
whose backward is not the primal's derivative: the weight goes in materialized, so the
user's backward runs. Outputs and adapter gradients equal the merged weight's (fp32, 1e-5). Prints
``OK``, or ``JAX-GRAD-FAILS`` when JAX's own grad of the base model fails under
the flag (then nothing of ours can be checked).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import llama  # noqa: E402

import jlora  # noqa: E402
from jlora._src.interpret.control import KEEPS_VJP  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def check(fn, params, adapter, x, loss, want_uses=("factored",)):
    uses = [u for us in jlora.explain(fn, params, adapter, x).values() for u in us]
    assert uses and set(uses) == set(want_uses), uses
    np.testing.assert_allclose(
        jlora.apply(fn)(params, adapter, x), fn(jlora.merge(params, adapter), x), **TOL
    )
    got = jax.jit(jax.grad(lambda a: loss(jlora.apply(fn)(params, a, x))))(adapter)
    want = jax.grad(lambda a: loss(fn(jlora.merge(params, a), x)))(adapter)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, **TOL)


def main():
    cfg = llama.LlamaConfig.named("tiny", remat=True)
    model, key = llama.Llama(cfg), jax.random.key(0)
    params = llama.init_params(cfg, key)
    ids = jax.random.randint(key, (2, 17), 0, cfg.vocab_size)
    loss = lambda logits: llama.loss_fn(logits, ids[:, 1:])
    try:
        jax.grad(lambda p: loss(model.apply(p, ids[:, :-1])))(params)
    except Exception as e:  # noqa: BLE001 - any failure of JAX's own grad
        print("JAX-GRAD-FAILS", type(e).__name__, str(e)[:200])
        return
    ad = jax.tree.map(
        lambda v: v + 0.01, jlora.init(key, params, jlora.LoraConfig.preset("general"))
    )
    check(model.apply, params, ad, ids[:, :-1], loss)
    # QLoRA: an NF4 base is dequantized inside jax.checkpoint, one layer at a time
    quantized = jlora.quantize(
        params, targets=("q_proj", "k_proj", "v_proj", "o_proj"), compute_dtype=jnp.float32
    )
    check(model.apply, quantized, ad, ids[:, :-1], loss)

    @jax.custom_vjp
    def scaled_matmul(x, w):
        return x @ w

    # half the true gradient: differentiating the primal body instead would give 2x
    scaled_matmul.defvjp(
        lambda x, w: (x @ w, (x, w)), lambda r, g: (0.5 * g @ r[1].T, 0.5 * r[0].T @ g)
    )
    p = {"q_proj": jax.random.normal(key, (4, 3))}
    ad = jax.tree.map(
        lambda v: v + 0.1, jlora.init(key, p, jlora.LoraConfig(rank=2, targets=("q_proj",)))
    )
    check(
        lambda p, x: jnp.tanh(scaled_matmul(x, p["q_proj"])),
        p,
        ad,
        jax.random.normal(key, (5, 4)),
        lambda y: jnp.sum(y**2),
        [f"materialized ({KEEPS_VJP})"],
    )
    print("OK")


if __name__ == "__main__":
    jax.config.update(sys.argv[1], True)  # before anything is traced
    main()
