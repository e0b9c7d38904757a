"""A small Llama-style decoder in Flax Linen.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` (``embed_tokens``,
``self_attn/q_proj``, ``mlp/gate_proj``, ``input_layernorm/weight``, ...).
Dense kernels use Flax's ``(in, out)`` layout, the transpose of PyTorch's.
Usage: ``Llama(cfg).apply(init_params(cfg, key), input_ids)``.
A Hugging Face checkpoint loads with
``from_hf(model.state_dict(), config_from_hf(model.config))``.
"""

import dataclasses
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

# Std of the normal init for kernels and embeddings (HF initializer_range).
INIT_STD = 0.02
# Score of masked attention positions; finite, so masked rows stay NaN-free.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)

# Named model sizes, as overrides of the LlamaConfig defaults.
CONFIGS = {
    "tiny": {},
    "bench": dict(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1408,
        num_layers=4,
        num_heads=8,
        max_seq_len=256,
    ),
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
            raise ValueError(
                "num_heads must divide hidden_size, and num_kv_heads must divide num_heads."
            )

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


def _explicit_spec(x) -> Optional[tuple]:
    """``x``'s partition spec under a mesh with explicit axes (``jax.make_mesh``'s
    default), else None: then JAX propagates shardings and nothing here applies."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    types = getattr(getattr(sharding, "mesh", None), "axis_types", ()) or ()
    if jax.sharding.AxisType.Explicit not in tuple(types):
        return None
    return tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))


def _dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` that, under explicit axes, names the output sharding of a
    row-parallel product (contracted axis sharded): the free axes keep theirs."""
    spec, out = _explicit_spec(lhs), None
    (lc, _), _ = dimension_numbers
    if spec is not None and any(spec[ax] is not None for ax in lc):
        free = [spec[ax] for ax in range(lhs.ndim) if ax not in lc]
        out = jax.sharding.PartitionSpec(*free, *([None] * (rhs.ndim - len(lc))))
    return jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out,
    )


def _dense(config: LlamaConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        dot_general=_dot,
        kernel_init=nn.initializers.normal(INIT_STD),
        name=name,
    )


class Embed(nn.Embed):
    """``nn.Embed`` whose lookup, under explicit axes, keeps the ids' sharding."""

    def __call__(self, inputs):
        spec = _explicit_spec(inputs)
        if spec is None:
            return super().__call__(inputs)
        embedding = self.embedding.astype(self.dtype)
        return embedding.at[inputs].get(out_sharding=jax.sharding.PartitionSpec(*spec, None))


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
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
        weight = weight.astype(self.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
        return weight * normed


def _norm(config: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(config.rms_norm_eps, config.dtype, config.param_dtype, name=name)


class Attention(nn.Module):
    """Causal self-attention with RoPE and optional grouped-query heads."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, rope, mask, cache=None, index=None):
        cfg = self.config
        batch, seq, _ = x.shape
        heads, kv_heads, head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        q = _dense(cfg, heads * head_dim, "q_proj")(x)
        k = _dense(cfg, kv_heads * head_dim, "k_proj")(x)
        v = _dense(cfg, kv_heads * head_dim, "v_proj")(x)
        q = apply_rope(q.reshape(batch, seq, heads, head_dim), *rope)
        k = apply_rope(k.reshape(batch, seq, kv_heads, head_dim), *rope)
        v = v.reshape(batch, seq, kv_heads, head_dim)
        if cache is not None:  # write this chunk at `index`, attend over the whole cache
            k, v = (
                jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), index, axis=1)
                for c, new in zip(cache, (k, v))
            )
            cache = (k, v)
        if kv_heads != heads:  # Same head grouping as HF's repeat_kv.
            k = jnp.repeat(k, heads // kv_heads, axis=2)
            v = jnp.repeat(v, heads // kv_heads, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores * head_dim**-0.5, MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        out = out.reshape(batch, seq, heads * head_dim)
        return _dense(cfg, cfg.hidden_size, "o_proj")(out), cache


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
    def __call__(self, x, rope, mask, cache=None, index=None):
        cfg = self.config
        h = _norm(cfg, "input_layernorm")(x)
        h, cache = Attention(cfg, name="self_attn")(h, rope, mask, cache, index)
        x = x + h
        h = _norm(cfg, "post_attention_layernorm")(x)
        return x + MLP(cfg, name="mlp")(h), cache


class Llama(nn.Module):
    """Llama-style causal language model."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, input_ids, positions=None, attention_mask=None, cache=None, cache_index=None
    ):
        """Returns float32 logits (batch, seq, vocab_size); with ``cache``, the pair
        (logits, updated cache).

        Args:
            input_ids: int array (batch, seq) of token ids.
            positions: optional int array (batch, seq); defaults to 0..seq-1.
            attention_mask: optional (batch, seq) array, 1 for real tokens and
                0 for padding; padded keys are never attended to.
            cache: optional KV cache ``(k, v)``, each (layers, batch, max_len, kv_heads,
                head_dim) (``init_cache``): this chunk's keys and values are written at
                ``cache_index`` and every query attends to the cache up to its position.
            cache_index: where this chunk starts in the cache (a scalar; default
                ``positions[0, 0]``; pass it to serve a mixed-adapter batch, whose
                examples jlora must not see mixed into one index).
        """
        cfg = self.config
        batch, seq = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq)[None, :], (batch, seq))
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None, None, :, :]
        index = None
        if cache is not None:
            index = positions[0, 0] if cache_index is None else cache_index
            keys = jnp.arange(cache[0].shape[2])
            mask = keys[None, None, None, :] <= positions[:, None, :, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        embed = Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.initializers.normal(INIT_STD),
            name="embed_tokens",
        )
        x = embed(input_ids)
        layer_cls = DecoderLayer
        if cfg.remat:
            layer_cls = nn.remat(layer_cls, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_layers,
            )
            x, cache = layers(cfg, name="layers")(x, rope, mask, cache, index)
        else:
            new = []
            for i in range(cfg.num_layers):
                layer = None if cache is None else (cache[0][i], cache[1][i])
                x, layer = layer_cls(cfg, name=f"layers_{i}")(x, rope, mask, layer, index)
                new.append(layer)
            if cache is not None:
                cache = tuple(jnp.stack(c) for c in zip(*new))
        x = _norm(cfg, "norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = _dense(cfg, cfg.vocab_size, "lm_head")(x)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, cache)


def init_cache(config: LlamaConfig, batch: int, max_len: int) -> tuple:
    """An empty KV cache ``(k, v)`` for ``Llama(config)(ids, positions, cache=...)``."""
    shape = (config.num_layers, batch, max_len, config.kv_heads, config.head_dim)
    return jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype)


def init_params(config: LlamaConfig, key: jax.Array, batch: int = 1, seq: int = 8) -> dict:
    """Initialises the model; returns the variables dict {'params': ...}."""
    return jax.jit(Llama(config).init)(key, jnp.zeros((batch, seq), jnp.int32))


def count_params(params) -> int:
    """Returns the total number of scalars in a parameter pytree."""
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


def loss_fn(logits: jax.Array, targets: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """Mean next-token cross-entropy, weighted by an optional 0/1 mask.

    Logits (batch, seq, vocab) and int targets (batch, seq) are already
    aligned: targets[:, t] is the token following position t, e.g. logits of
    ids[:, :-1] against targets ids[:, 1:]. Returns a float32 scalar.
    """
    logits = logits.astype(jnp.float32)
    if _explicit_spec(logits) is None:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    else:  # a one-hot sum instead of a gather from the vocab axis, which may be sharded
        picked = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
        losses = -jnp.sum(jax.nn.log_softmax(logits) * picked, axis=-1)
    if mask is None:
        return jnp.mean(losses)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def config_from_hf(hf_config, **overrides) -> LlamaConfig:
    """Returns the LlamaConfig of a transformers ``LlamaConfig`` or its dict.

    transformers 5 keeps ``rope_theta`` in ``rope_parameters`` (alias
    ``rope_scaling``); older configs keep it at the top level. Only the
    default RoPE (no scaling), SiLU and bias-free projections are supported.
    """
    d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    heads, hidden = d["num_attention_heads"], d["hidden_size"]
    if (
        rope_type != "default"
        or d.get("hidden_act", "silu") != "silu"
        or d.get("attention_bias")
        or d.get("mlp_bias")
        or (d.get("head_dim") or hidden // heads) != hidden // heads
    ):
        raise ValueError(
            "Unsupported HF Llama config: needs default RoPE, "
            "silu, no biases and head_dim == hidden/heads."
        )
    fields = dict(
        vocab_size=d["vocab_size"],
        hidden_size=hidden,
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        max_seq_len=d.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 1e4))),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )
    return LlamaConfig(**{**fields, **overrides})


def hf_module(path: str, index: tuple = ()) -> str:
    """Returns the HF module path of a parameter path string.

    E.g. ``params/layers/mlp/up_proj/kernel`` with stack index ``(3,)`` gives
    ``model.layers.3.mlp.up_proj``; ``params/lm_head/kernel`` gives
    ``lm_head``. The PEFT ``base_model.model.`` prefix is not included.
    """
    parts = path.split("/")
    if parts[0] == "params":
        parts = parts[1:]
    parts, head = parts[:-1], parts[0]
    unscanned = re.fullmatch(r"layers_(\d+)", head)
    scanned = head == "layers"
    if len(index) != int(scanned):
        raise ValueError(f"{path!r} needs {int(scanned)} stack indices, got {index!r}.")
    if scanned or unscanned:
        layer = int(index[0] if scanned else unscanned.group(1))
        parts = ["layers", str(layer)] + parts[1:]
    return ".".join(parts if head == "lm_head" else ["model"] + parts)


def _to_numpy(value) -> np.ndarray:
    """A numpy array from a numpy array or torch tensor (bfloat16 upcast)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16.
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _scanned(path: str) -> bool:
    """Whether a parameter path lives in the scanned (stacked) layers."""
    return "layers" in path.split("/")[:2]


def _hf_names(path: str, config: LlamaConfig) -> list:
    """The HF state-dict names of one parameter, one per stacked layer."""
    indices = [(i,) for i in range(config.num_layers)] if _scanned(path) else [()]
    return [hf_module(path, index) + ".weight" for index in indices]


def _hf_leaf(state_dict, names: list, path: str, shape: tuple) -> np.ndarray:
    """One parameter from its HF tensors: transposed, stacked if scanned."""
    arrays = [_to_numpy(state_dict[name]) for name in names]
    if path.endswith("/kernel"):  # torch Linear weights are (out, in).
        arrays = [a.T for a in arrays]
    value = np.stack(arrays) if _scanned(path) else arrays[0]
    if value.shape != shape:
        raise ValueError(f"{names} have shape {value.shape}; {path} needs {shape}.")
    return value


def from_hf(state_dict: Mapping[str, Any], config: LlamaConfig) -> dict:
    """Returns variables ``{'params': ...}`` from a HF LlamaForCausalLM state dict.

    Linear weights (out, in) become (in, out) kernels; layers are stacked on
    axis 0 when ``config.scan_layers``. Values are cast to
    ``config.param_dtype``. Raises ValueError on missing, unexpected or
    mis-shaped tensors. E.g. ``from_hf(model.state_dict(),
    config_from_hf(model.config))``.
    """
    like = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    paths = ["/".join(str(k.key) for k in p) for p, _ in flat]
    wanted = {p: _hf_names(p, config) for p in paths}
    needed = {name for names in wanted.values() for name in names}
    given = {k for k in state_dict if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:  # Tied models may still list lm_head.weight.
        given.discard("lm_head.weight")
    if needed != given:
        raise ValueError(
            f"HF state dict does not match the model: missing "
            f"{sorted(needed - given)}, unexpected "
            f"{sorted(given - needed)}."
        )
    leaves = [
        jnp.asarray(_hf_leaf(state_dict, wanted[p], p, leaf.shape), config.param_dtype)
        for p, (_, leaf) in zip(paths, flat)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def to_hf(params, config: LlamaConfig) -> dict:
    """The inverse of :func:`from_hf`: ``{hf_name: numpy array}`` (torch layout)."""
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = "/".join(str(k.key) for k in kp)
        value = np.asarray(leaf)
        layers = list(value) if _scanned(path) else [value]
        for name, v in zip(_hf_names(path, config), layers):
            out[name] = v.T if path.endswith("/kernel") else v
    return out


# Megatron-style tensor parallelism: column-parallel layers shard their output
# features, row-parallel layers their input features, on the "model" mesh axis.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
ROW_PARALLEL = ("o_proj", "down_proj")


def megatron_spec(path: str, ndim: int, axis: str = "model") -> jax.sharding.PartitionSpec:
    """PartitionSpec of a parameter (``/``-joined key path, e.g. jlora's ``path_str``)."""
    P = jax.sharding.PartitionSpec
    name = path.split("/")[-2] if "/" in path else path
    if name in COLUMN_PARALLEL:
        return P(*([None] * (ndim - 1)), axis)
    if name in ROW_PARALLEL:
        return P(*([None] * (ndim - 2)), axis, None)
    return P()
