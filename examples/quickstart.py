"""jlora in one screen: adapt a small Llama, train the adapter, merge it.

Run: python examples/quickstart.py   (about 20 s on 2 CPU cores)

The base is randomly initialised (nothing is downloaded) and frozen; only the
LoRA factors of q,k,v,o (the source article's "general" preset) are trained,
to answer a digit string with each digit plus 3 (mod 10). The answer sits a
fixed distance behind its digit, which rotary attention can find from any
random base; reversing instead needs absolute positions, which this base lacks.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
import llama  # noqa: E402

import jlora  # noqa: E402

STEPS, BATCH, DIGITS, SEP = 300, 32, 8, 10  # tokens 0-9 are digits, 10 separates


def batch(key):
    """``d1..dn SEP d1+3..dn+3`` (mod 10); loss on the answer only."""
    digits = jax.random.randint(key, (BATCH, DIGITS), 0, 10)
    ids = jnp.concatenate([digits, jnp.full((BATCH, 1), SEP), (digits + 3) % 10], axis=1)
    mask = jnp.arange(ids.shape[1] - 1) >= DIGITS  # predict tokens after the separator
    return ids, jnp.broadcast_to(mask, (BATCH, ids.shape[1] - 1)).astype(jnp.float32)


def main():
    cfg = llama.LlamaConfig(vocab_size=16)
    model = llama.Llama(cfg)
    key = jax.random.key(0)
    params = llama.init_params(cfg, key)  # the frozen base
    lora_cfg = jlora.LoraConfig.preset("general")  # r16, alpha 32, q,k,v,o
    adapter = jlora.init(jax.random.fold_in(key, 1), params, lora_cfg)
    n_base, n_lora = llama.count_params(params), llama.count_params(adapter)
    print(f"trainable: {n_lora:,} of {n_base:,} parameters ({100 * n_lora / n_base:.2f}%)")
    print(
        "uses:",
        {
            k.split("/")[-2]: v
            for k, v in jlora.explain(model.apply, params, adapter, batch(key)[0]).items()
        },
    )

    lora_apply = jlora.apply(model.apply)
    tx = optax.adamw(3e-3)

    def loss_fn(ad, ids, mask):
        return llama.loss_fn(lora_apply(params, ad, ids[:, :-1]), ids[:, 1:], mask)

    @jax.jit
    def step(ad, opt_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(ad, *batch(key))
        updates, opt_state = tx.update(grads, opt_state, ad)
        return optax.apply_updates(ad, updates), opt_state, loss

    opt_state = tx.init(adapter)
    start = loss_fn(adapter, *batch(jax.random.key(99)))
    t0 = time.perf_counter()
    for i in range(STEPS):
        adapter, opt_state, loss = step(adapter, opt_state, jax.random.fold_in(key, 100 + i))
        if i % 50 == 0 or i == STEPS - 1:
            print(f"step {i:4d}  loss {float(loss):.3f}")
    print(f"{STEPS} steps in {time.perf_counter() - t0:.1f} s")

    ids, mask = batch(jax.random.key(99))
    end = loss_fn(adapter, ids, mask)
    merged = jlora.merge(params, adapter)  # plain arrays: no LoRA at inference
    unmerged_logits = jax.jit(lora_apply)(params, adapter, ids[:, :-1])
    merged_logits = jax.jit(model.apply)(merged, ids[:, :-1])
    acc = lambda logits: float(((logits.argmax(-1) == ids[:, 1:]) * mask).sum() / mask.sum())
    base_acc = acc(model.apply(params, ids[:, :-1]))
    print(
        f"held-out loss {float(start):.3f} -> {float(end):.3f}; "
        f"answer accuracy {acc(merged_logits):.1%} (base {base_acc:.1%})"
    )
    print("merged == unmerged:", bool(np.allclose(merged_logits, unmerged_logits, atol=1e-4)))


if __name__ == "__main__":
    main()
