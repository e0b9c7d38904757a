"""Flax NNX with ``nnx.LoRALinear`` on q,k,v,o for ``peers.py``: the same weights."""

import jax
import jax.numpy as jnp
import llama
import optax
from flax import nnx
from peers import LR, RANK, TARGETS, base_params, batch, config, timed


class Layer(nnx.Module):
    def __init__(self, w, cfg, lora: bool, rngs):
        def linear(block, name):
            kernel = w[block][name]["kernel"]
            if lora and name in TARGETS:
                m = nnx.LoRALinear(*kernel.shape, lora_rank=RANK, use_bias=False, rngs=rngs)
                m.lora.lora_b.value = m.lora.lora_b.value + 1e-3  # B != 0
            else:
                m = nnx.Linear(*kernel.shape, use_bias=False, rngs=rngs)
            m.kernel.value = kernel
            return m

        self.cfg = cfg
        self.q, self.k, self.v, self.o = (linear("self_attn", n) for n in TARGETS)
        self.gate, self.up, self.down = (
            linear("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")
        )
        self.n1 = nnx.Param(w["input_layernorm"]["weight"])
        self.n2 = nnx.Param(w["post_attention_layernorm"]["weight"])

    def __call__(self, x, rope, mask):
        cfg, (b, s, _) = self.cfg, x.shape
        h = norm(x, self.n1.value, cfg.rms_norm_eps)
        split = lambda t: t.reshape(b, s, cfg.num_heads, cfg.head_dim)
        q, k = (llama.apply_rope(split(f(h)), *rope) for f in (self.q, self.k))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * cfg.head_dim**-0.5
        probs = jax.nn.softmax(jnp.where(mask, scores, llama.MASK_VALUE), axis=-1)
        x = x + self.o(jnp.einsum("bhqk,bkhd->bqhd", probs, split(self.v(h))).reshape(b, s, -1))
        h = norm(x, self.n2.value, cfg.rms_norm_eps)
        return x + self.down(nnx.silu(self.gate(h)) * self.up(h))


def norm(x, w, eps):
    return w * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class Model(nnx.Module):
    def __init__(self, lora: bool):
        cfg, p = config(), base_params()["params"]
        rngs = nnx.Rngs(0)
        self.cfg, self.embed = cfg, nnx.Param(p["embed_tokens"]["embedding"])
        self.layers = nnx.List(
            [Layer(p[f"layers_{i}"], cfg, lora, rngs) for i in range(cfg.num_layers)]
        )
        self.norm, self.head = nnx.Param(p["norm"]["weight"]), nnx.Param(p["lm_head"]["kernel"])

    def __call__(self, ids):
        b, s = ids.shape
        rope = llama.rope_tables(
            jnp.broadcast_to(jnp.arange(s), (b, s)), self.cfg.head_dim, self.cfg.rope_theta
        )
        mask = jnp.tril(jnp.ones((s, s), bool))[None, None]
        x = self.embed.value[ids]
        for layer in self.layers:
            x = layer(x, rope, mask)
        return norm(x, self.norm.value, self.cfg.rms_norm_eps) @ self.head.value


def _forward(model):
    graph, state = nnx.split(model)
    f = jax.jit(lambda state, x: nnx.merge(graph, state)(x))
    return lambda x: jax.block_until_ready(f(state, x))


def _step(model, wrt):
    """AdamW on the ``wrt`` variables (``nnx.LoRAParam``: the adapter; ``nnx.Param``: all)."""
    graph, trained, frozen = nnx.split(model, wrt, ...)
    tx = optax.adamw(LR)
    state = [trained, tx.init(trained)]

    @jax.jit
    def step(trained, opt, frozen, ids):
        loss = lambda t: llama.loss_fn(nnx.merge(graph, t, frozen)(ids[:, :-1]), ids[:, 1:])
        grads = jax.grad(loss)(trained)
        updates, opt = tx.update(grads, opt, trained)
        return optax.apply_updates(trained, updates), opt

    def run(ids):
        state[:] = jax.block_until_ready(step(state[0], state[1], frozen, ids))

    return run


def run(repeats: int) -> dict:
    ids = jnp.asarray(batch())
    x = ids[:, :-1]
    base, lora, merged = Model(False), Model(True), Model(False)
    for ml, mm in zip(lora.layers, merged.layers):
        for name in ("q", "k", "v", "o"):
            src = getattr(ml, name)
            getattr(mm, name).kernel.value = (
                src.kernel.value + src.lora.lora_a.value @ src.lora.lora_b.value
            )
    fwd = {k: _forward(m) for k, m in (("base", base), ("lora", lora), ("merged", merged))}
    lora_step, full_step = _step(lora, nnx.LoRAParam), _step(Model(False), nnx.Param)
    calls = dict(
        base_forward=lambda: fwd["base"](x),
        lora_forward=lambda: fwd["lora"](x),
        merged_forward=lambda: fwd["merged"](x),
        lora_step=lambda: lora_step(ids),
        full_step=lambda: full_step(ids),
    )
    return timed(calls, repeats)
