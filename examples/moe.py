"""A small mixture-of-experts layer (router, top-k, ``lax.ragged_dot`` experts) with LoRA on
the experts: jlora computes each expert's update factored, per group of tokens.

Run: python examples/moe.py   (CPU, a few seconds)

The experts are ``(experts, in, out)`` kernels; ``jlora.init`` with the layer's
function learns that the expert axis is stacked, so every expert gets its own
``A (in, r)`` and ``B (r, out)``. The demo fits the adapter to a target layer
(the base plus a random low-rank change of every expert) and prints the loss.
"""

import sys

import jax
import jax.numpy as jnp
import optax
from jax import lax

import jlora

EXPERTS, TOP_K, DIM, HIDDEN = 8, 2, 32, 64


def init_params(key, experts=EXPERTS, dim=DIM, hidden=HIDDEN):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "router": jax.random.normal(k1, (dim, experts)) / dim**0.5,
        "experts": {
            "w_in": jax.random.normal(k2, (experts, dim, hidden)) / dim**0.5,
            "w_out": jax.random.normal(k3, (experts, hidden, dim)) / hidden**0.5,
        },
    }


def moe(params, x, top_k=TOP_K):
    """``x (tokens, dim)``: each token goes to its ``top_k`` experts (softmax weights over
    those); tokens are sorted by expert so each expert's rows are contiguous."""
    tokens, experts = x.shape[0], params["router"].shape[1]
    weights, chosen = lax.top_k(jax.nn.softmax(x @ params["router"]), top_k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    flat = chosen.reshape(-1)  # (tokens * top_k,)
    order = jnp.argsort(flat)
    rows = (jnp.arange(tokens * top_k) // top_k)[order]
    sizes = jnp.bincount(flat, length=experts).astype(jnp.int32)
    h = jax.nn.gelu(lax.ragged_dot(x[rows], params["experts"]["w_in"], sizes))
    y = lax.ragged_dot(h, params["experts"]["w_out"], sizes)
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[rows].add(y)


def main(steps=150):
    key = jax.random.key(0)
    params = init_params(key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (256, DIM))
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=("w_in", "w_out"))
    teacher = jax.tree.map(
        lambda a: a + 0.05, jlora.init(jax.random.fold_in(key, 2), params, cfg, moe, x)
    )
    target = jlora.apply(moe)(params, teacher, x)
    adapter = jlora.init(key, params, cfg, moe, x)
    print("uses:", jlora.explain(moe, params, adapter, x))
    tx = optax.adam(1e-2)
    opt = tx.init(adapter)

    @jax.jit
    def step(adapter, opt):
        loss = lambda ad: jnp.mean(jnp.square(jlora.apply(moe)(params, ad, x) - target))
        value, grads = jax.value_and_grad(loss)(adapter)
        updates, opt = tx.update(grads, opt, adapter)
        return optax.apply_updates(adapter, updates), opt, value

    for i in range(steps):
        adapter, opt, value = step(adapter, opt)
        if i % 50 == 0 or i == steps - 1:
            print(f"step {i:3d}  loss {float(value):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
