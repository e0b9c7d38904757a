"""Plain-JAX ports of transformers' Llama, Mixtral (fused MoE experts), gpt-oss and GPT-2
that read a torch state dict as it is: weights stay in torch's layout (``nn.Linear``
``(out, in)`` used as ``x @ W.T``; GPT-2's ``Conv1D`` ``(in, out)`` used as ``x @ W``;
Mixtral's experts ``(E, out, in)`` and gpt-oss's ``(E, in, out)`` through
``lax.ragged_dot``), as a port of a torch model keeps them.

The params tree nests the state dict's dotted names, so ``jlora.peft.default_module``
maps each leaf to its torch module. fp32 throughout; only the tests use these.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def tree(state_dict, drop=()) -> dict:
    """``{"model": {"layers": {"0": {...}}}}`` from a torch state dict (float32 arrays)."""
    out: dict = {}
    for k, v in state_dict.items():
        if k in drop:
            continue
        *parents, leaf = k.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(v.detach().float().numpy())
    return out


def _lead(v, x):
    """``v`` with leading unit axes to ``x``'s rank (the tests raise on rank promotion)."""
    return v.reshape((1,) * (x.ndim - v.ndim) + v.shape)


def _rms(x, w, eps):
    x32 = x.astype(jnp.float32)
    return _lead(w, x) * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps))


def _rope(x, theta):
    s, hd = x.shape[1], x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd)
    f = np.outer(np.arange(s, dtype=np.float32), inv)
    emb = np.concatenate([f, f], -1)[None, :, None, :]
    half = jnp.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * np.cos(emb) + half * np.sin(emb)


def _attend(q, k, v, window=None, sinks=None):
    """Causal softmax attention, (b, s, h, d) each (k, v already repeated); ``window``:
    each query sees the last ``window`` positions; ``sinks (h,)``: gpt-oss's per-head
    logit that joins the softmax and is dropped after it."""
    s = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    seen = np.tril(np.ones((s, s), bool))
    if window is not None:
        seen &= np.subtract.outer(np.arange(s), np.arange(s)) < window
    logits = jnp.where(seen[None, None], logits, -1e30)
    if sinks is None:
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)
    sink = jnp.broadcast_to(sinks[None, :, None, None], (*logits.shape[:3], 1))
    probs = jax.nn.softmax(jnp.concatenate([logits, sink], -1), -1)[..., :-1]
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _llama_attn(p, x, c):
    b, s, _ = x.shape
    hd = (
        c.hidden_size // c.num_attention_heads
        if getattr(c, "head_dim", None) is None
        else c.head_dim
    )
    lin = lambda name: x @ p[name]["weight"].T
    q = lin("q_proj").reshape(b, s, -1, hd)
    k = lin("k_proj").reshape(b, s, -1, hd)
    v = lin("v_proj").reshape(b, s, -1, hd)
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    q, k = _rope(q, theta), _rope(k, theta)
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2)
    return _attend(q, k, v).reshape(b, s, -1) @ p["o_proj"]["weight"].T


def _mlp(p, x):
    return (jax.nn.silu(x @ p["gate_proj"]["weight"].T) * (x @ p["up_proj"]["weight"].T)) @ p[
        "down_proj"
    ]["weight"].T


def _moe(p, x, c):
    """Mixtral's sparse block: softmax router, top-k renormalized, experts by ragged_dot."""
    b, s, d = x.shape
    x = x.reshape(-1, d)
    probs = jax.nn.softmax(x @ p["gate"]["weight"].T, -1)
    top, idx = jax.lax.top_k(probs, c.num_experts_per_tok)
    top = top / top.sum(-1, keepdims=True)
    e = idx.reshape(-1)
    order = jnp.argsort(e)
    token = order // c.num_experts_per_tok
    sizes = jnp.bincount(e, length=c.num_local_experts).astype(jnp.int32)
    ex = p["experts"]
    h = jax.lax.ragged_dot(x[token], jnp.swapaxes(ex["gate_up_proj"], 1, 2), sizes)
    gate, up = jnp.split(h, 2, -1)
    y = jax.lax.ragged_dot(jax.nn.silu(gate) * up, jnp.swapaxes(ex["down_proj"], 1, 2), sizes)
    y = y * top.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[token].add(y).reshape(b, s, d)


def llama(params, ids, c):
    """Logits of a transformers ``LlamaForCausalLM`` (or ``MixtralForCausalLM``: config
    ``c`` with ``num_local_experts``) from its torch-layout ``params``."""
    m = params["model"]
    x = m["embed_tokens"]["weight"][ids]
    for i in range(c.num_hidden_layers):
        layer = m["layers"][str(i)]
        x = x + _llama_attn(
            layer["self_attn"], _rms(x, layer["input_layernorm"]["weight"], c.rms_norm_eps), c
        )
        h = _rms(x, layer["post_attention_layernorm"]["weight"], c.rms_norm_eps)
        x = x + (
            _moe(layer["mlp"], h, c) if hasattr(c, "num_local_experts") else _mlp(layer["mlp"], h)
        )
    x = _rms(x, m["norm"]["weight"], c.rms_norm_eps)
    head = params["lm_head"]["weight"] if "lm_head" in params else m["embed_tokens"]["weight"]
    return x @ head.T


def _gpt_oss_attn(p, x, c, window):
    b, s, _ = x.shape
    lin = lambda name: x @ p[name]["weight"].T + _lead(p[name]["bias"], x)
    q, k, v = (lin(n).reshape(b, s, -1, c.head_dim) for n in ("q_proj", "k_proj", "v_proj"))
    theta = c.rope_parameters["rope_theta"]
    q, k = _rope(q, theta), _rope(k, theta)
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2)
    a = _attend(q, k, v, window, p["sinks"]).reshape(b, s, -1)
    return a @ p["o_proj"]["weight"].T + _lead(p["o_proj"]["bias"], a)


def _gpt_oss_moe(p, x, c):
    """gpt-oss's MoE: router with a bias, softmax over the top-k logits, experts ``(E, in,
    out)`` with biases by ragged_dot, the clamped SwiGLU over interleaved gate/up columns."""
    b, s, d = x.shape
    x = x.reshape(-1, d)
    logits = x @ p["router"]["weight"].T + _lead(p["router"]["bias"], x)
    top, idx = jax.lax.top_k(logits, c.num_experts_per_tok)
    weights = jax.nn.softmax(top, -1)
    e = idx.reshape(-1)
    order = jnp.argsort(e)
    token, expert = order // c.num_experts_per_tok, e[order]
    sizes = jnp.bincount(e, length=c.num_local_experts).astype(jnp.int32)
    ex = p["experts"]
    h = jax.lax.ragged_dot(x[token], ex["gate_up_proj"], sizes) + ex["gate_up_proj_bias"][expert]
    gate = jnp.minimum(h[:, ::2], c.swiglu_limit)
    up = jnp.clip(h[:, 1::2], -c.swiglu_limit, c.swiglu_limit)
    glu = gate * jax.nn.sigmoid(gate * c.swiglu_alpha)
    y = jax.lax.ragged_dot((up + 1) * glu, ex["down_proj"], sizes) + ex["down_proj_bias"][expert]
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[token].add(y).reshape(b, s, d)


def gpt_oss(params, ids, c):
    """Logits of a transformers ``GptOssForCausalLM`` with default RoPE (config ``c``),
    eager attention: sliding-window layers as ``c.layer_types`` says, attention sinks."""
    m = params["model"]
    x = m["embed_tokens"]["weight"][ids]
    for i in range(c.num_hidden_layers):
        layer = m["layers"][str(i)]
        window = c.sliding_window if c.layer_types[i] == "sliding_attention" else None
        h = _rms(x, layer["input_layernorm"]["weight"], c.rms_norm_eps)
        x = x + _gpt_oss_attn(layer["self_attn"], h, c, window)
        h = _rms(x, layer["post_attention_layernorm"]["weight"], c.rms_norm_eps)
        x = x + _gpt_oss_moe(layer["mlp"], h, c)
    return _rms(x, m["norm"]["weight"], c.rms_norm_eps) @ params["lm_head"]["weight"].T


def _ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * _lead(p["weight"], x) + _lead(p["bias"], x)


def gpt2(params, ids, c):
    """Logits of a transformers ``GPT2LMHeadModel`` (tied head) from its state dict:
    ``Conv1D`` weights ``(in, out)`` used as ``x @ W + b``."""
    t = params["transformer"]
    conv = lambda p, x: x @ p["weight"] + _lead(p["bias"], x)
    b, s = ids.shape
    x = t["wte"]["weight"][ids] + t["wpe"]["weight"][None, :s]
    hd = c.n_embd // c.n_head
    for i in range(c.n_layer):
        blk = t["h"][str(i)]
        q, k, v = jnp.split(conv(blk["attn"]["c_attn"], _ln(x, blk["ln_1"])), 3, -1)
        heads = lambda z: z.reshape(b, s, c.n_head, hd)
        a = _attend(heads(q), heads(k), heads(v)).reshape(b, s, -1)
        x = x + conv(blk["attn"]["c_proj"], a)
        h = jax.nn.gelu(conv(blk["mlp"]["c_fc"], _ln(x, blk["ln_2"])), approximate=True)
        x = x + conv(blk["mlp"]["c_proj"], h)
    return _ln(x, t["ln_f"]) @ t["wte"]["weight"].T
