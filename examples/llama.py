"""A small Llama-style decoder in Flax Linen.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` (``embed_tokens``,
``self_attn/q_proj``, ``mlp/gate_proj``, ``input_layernorm/weight``, ...).
Dense kernels use Flax's ``(in, out)`` layout, the transpose of PyTorch's.
Usage: ``Llama(cfg).apply(init_params(cfg, key), input_ids)``.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# Std of the normal init for kernels and embeddings (HF initializer_range).
INIT_STD = 0.02
# Score of masked attention positions; finite, so masked rows stay NaN-free.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)

# Named model sizes, as overrides of the LlamaConfig defaults.
CONFIGS = {
    "tiny": {},
    "bench": dict(vocab_size=8000, hidden_size=512, intermediate_size=1408,
                  num_layers=4, num_heads=8, max_seq_len=256),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama hyperparameters; the defaults are the "tiny" size."""

    vocab_size: int = 256
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # None means num_heads (no GQA).
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    scan_layers: bool = True
    remat: bool = False
    dtype: Any = jnp.float32  # Compute dtype.
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.kv_heads:
            raise ValueError("num_heads must divide hidden_size, and "
                             "num_kv_heads must divide num_heads.")

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (num_heads unless using GQA)."""
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        """Size of each attention head."""
        return self.hidden_size // self.num_heads

    @classmethod
    def named(cls, name: str, **overrides) -> "LlamaConfig":
        """Returns the size `name` from `CONFIGS`, with field overrides."""
        return cls(**{**CONFIGS[name], **overrides})


def _dense(config: LlamaConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=config.dtype,
                    param_dtype=config.param_dtype,
                    kernel_init=nn.initializers.normal(INIT_STD), name=name)


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
    """Returns rotary (cos, sin) tables, each (batch, seq, 1, head_dim)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x (batch, seq, heads, head_dim) with HF's rotate_half layout."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a `weight` scale, computed in float32."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],),
                            self.param_dtype)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
        weight = weight.astype(self.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
        return weight * normed


def _norm(config: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(config.rms_norm_eps, config.dtype, config.param_dtype,
                   name=name)


class Attention(nn.Module):
    """Causal self-attention with RoPE and optional grouped-query heads."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, rope, mask):
        cfg = self.config
        batch, seq, _ = x.shape
        heads, kv_heads, head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        q = _dense(cfg, heads * head_dim, "q_proj")(x)
        k = _dense(cfg, kv_heads * head_dim, "k_proj")(x)
        v = _dense(cfg, kv_heads * head_dim, "v_proj")(x)
        q = apply_rope(q.reshape(batch, seq, heads, head_dim), *rope)
        k = apply_rope(k.reshape(batch, seq, kv_heads, head_dim), *rope)
        v = v.reshape(batch, seq, kv_heads, head_dim)
        if kv_heads != heads:  # Same head grouping as HF's repeat_kv.
            k = jnp.repeat(k, heads // kv_heads, axis=2)
            v = jnp.repeat(v, heads // kv_heads, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                            preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores * head_dim**-0.5, MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        out = out.reshape(batch, seq, heads * head_dim)
        return _dense(cfg, cfg.hidden_size, "o_proj")(out)


class MLP(nn.Module):
    """SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg, cfg.intermediate_size, "gate_proj")(x)
        up = _dense(cfg, cfg.intermediate_size, "up_proj")(x)
        return _dense(cfg, cfg.hidden_size, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block; returns (x, None) so it can be scanned."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, rope, mask):
        cfg = self.config
        h = _norm(cfg, "input_layernorm")(x)
        x = x + Attention(cfg, name="self_attn")(h, rope, mask)
        h = _norm(cfg, "post_attention_layernorm")(x)
        return x + MLP(cfg, name="mlp")(h), None


class Llama(nn.Module):
    """Llama-style causal language model."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, positions=None, attention_mask=None):
        """Returns float32 logits (batch, seq, vocab_size).

        Args:
            input_ids: int array (batch, seq) of token ids.
            positions: optional int array (batch, seq); defaults to 0..seq-1.
            attention_mask: optional (batch, seq) array, 1 for real tokens and
                0 for padding; padded keys are never attended to.
        """
        cfg = self.config
        batch, seq = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq)[None, :], (batch, seq))
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None, None, :, :]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype,
                         embedding_init=nn.initializers.normal(INIT_STD),
                         name="embed_tokens")
        x = embed(input_ids)
        layer_cls = DecoderLayer
        if cfg.remat:
            layer_cls = nn.remat(layer_cls, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            layers = nn.scan(layer_cls, variable_axes={"params": 0},
                             split_rngs={"params": True},
                             in_axes=(nn.broadcast, nn.broadcast),
                             length=cfg.num_layers)
            x, _ = layers(cfg, name="layers")(x, rope, mask)
        else:
            for i in range(cfg.num_layers):
                x, _ = layer_cls(cfg, name=f"layers_{i}")(x, rope, mask)
        x = _norm(cfg, "norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = _dense(cfg, cfg.vocab_size, "lm_head")(x)
        return logits.astype(jnp.float32)


def init_params(config: LlamaConfig, key: jax.Array, batch: int = 1,
                seq: int = 8) -> dict:
    """Initialises the model; returns the variables dict {'params': ...}."""
    return jax.jit(Llama(config).init)(key, jnp.zeros((batch, seq), jnp.int32))


def count_params(params) -> int:
    """Returns the total number of scalars in a parameter pytree."""
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


def loss_fn(logits: jax.Array, targets: jax.Array,
            mask: Optional[jax.Array] = None) -> jax.Array:
    """Mean next-token cross-entropy, weighted by an optional 0/1 mask.

    Logits (batch, seq, vocab) and int targets (batch, seq) are already
    aligned: targets[:, t] is the token following position t, e.g. logits of
    ids[:, :-1] against targets ids[:, 1:]. Returns a float32 scalar.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets)
    if mask is None:
        return jnp.mean(losses)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
