"""LoRA configuration and the presets from the source article's table."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Init:
    """One value of ``LoraConfig.init``. ``changes_base``: it moves part of each weight
    into the factors, and ``init_with_base`` returns the residual base; ``needs_data``:
    ``jlora.init_from_data`` computes it from batches of inputs (``jlora.init`` refuses)."""

    name: str
    changes_base: bool = False
    needs_data: bool = False


#: The inits, by name: the one table ``LoraConfig``, ``init`` and ``init_from_data`` read
#: (besides ``pissa_niter_<K>`` for any K: PiSSA by randomized SVD, :func:`init_of`).
INITS = {
    i.name: i
    for i in (
        Init("kaiming"),
        Init("gaussian"),
        Init("orthogonal"),
        Init("pissa", changes_base=True),
        Init("olora", changes_base=True),
        Init("loftq", changes_base=True),
        Init("lora_ga", changes_base=True, needs_data=True),
        Init("corda", changes_base=True, needs_data=True),
        Init("eva", needs_data=True),
    )
}
_NITER = re.compile(r"pissa_niter_(\d+)")


def init_of(init: str) -> Init | None:
    """The table's entry for ``init`` (``pissa_niter_<K>`` is PiSSA's), None if unknown."""
    return INITS["pissa"] if _NITER.fullmatch(init) else INITS.get(init)


def changes_base(init: str) -> bool:
    """Whether ``init`` moves part of each weight into the factors when ``init_with_base``
    makes it (PiSSA, OLoRA, LoftQ)."""
    spec = init_of(init)
    return spec is not None and spec.changes_base and not spec.needs_data


def needs_data(init: str) -> bool:
    """Whether ``init`` is computed from data by ``jlora.init_from_data``."""
    spec = init_of(init)
    return spec is not None and spec.needs_data


def niter(init: str) -> int | None:
    """``K`` of ``"pissa_niter_K"`` (randomized SVD's subspace iterations), else None."""
    m = _NITER.fullmatch(init)
    return None if m is None else int(m.group(1))


def scaling(alpha: float, rank: int, rslora: bool) -> float:
    """The factor ``s`` in ``W0 + s * A @ B``: ``alpha / rank``, or ``alpha / sqrt(rank)``
    with rsLoRA (PEFT's ``use_rslora``). The one place the rule is written."""
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


#: Names of the segment that lists a model's layers (PEFT's ``COMMON_LAYERS_PATTERN``).
LAYER_PATTERNS = ("layers", "layer", "h", "blocks", "block")

#: Hugging Face Llama names of every linear layer in a decoder block.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION + MLP


class LoraError(ValueError):
    """A user error: the message names the parameter path and the fix.

    A ``ValueError``, so code that catches those catches it.

    Examples:
      >>> try:
      ...     jlora.LoraConfig(rank=0)
      ... except jlora.LoraError as e:
      ...     print(e)
      rank=0 must be a positive integer (e.g. 8 or 16)
    """


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise LoraError(
            f"{name}={pattern!r} is not a valid regular expression ({e}); "
            "pass a valid regex or a tuple of module names"
        ) from None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how (PEFT's names in brackets).

    Args:
      rank: rank ``r`` of the update ``A @ B`` [``r``].
      alpha: scaling numerator; the update is scaled by ``alpha / rank``
        (``alpha / sqrt(rank)`` with ``rslora``) [``lora_alpha``].
      targets: a regex (``re.search`` on the ``/``-joined key path, e.g.
        ``params/layers/self_attn/q_proj/kernel``) or a tuple of module names,
        each matching one path segment exactly [``target_modules``].
      dropout: dropout rate on the LoRA input only [``lora_dropout``].
      rslora: scale by ``alpha / sqrt(rank)`` [``use_rslora``].
      dora: weight-decomposed LoRA: a trained magnitude per output feature [``use_dora``].
      rank_pattern: ``{regex: rank}`` overriding ``rank`` for matching paths.
      alpha_pattern: ``{regex: alpha}`` overriding ``alpha`` likewise.
      init: ``"kaiming"`` (PEFT's default: A ~ U(+-1/sqrt(in))), ``"gaussian"``
        (A ~ N(0, 1/r^2)), ``"orthogonal"`` (A and B from orthogonal halves of a random
        ``r x r`` rotation, so ``A B = 0``; even ranks), ``"pissa"`` (principal singular
        vectors), ``"pissa_niter_<K>"`` (the same by randomized SVD with K subspace
        iterations: fast at 7B sizes), ``"olora"`` (the first r columns of the weight's
        QR factors), ``"loftq"`` (an NF4 base and the factors that best correct it), or,
        computed from data by ``jlora.init_from_data``, ``"lora_ga"`` (the averaged
        gradient's singular directions), ``"corda"`` and ``"eva"``
        [``init_lora_weights``].
      dtype: dtype of the adapter arrays. ``None``: float32 on a base leaf of lower
        precision (bf16, f16, fp8), as PEFT's ``autocast_adapter_dtype``, else the leaf's
        own; ``"base"``: each base leaf's dtype (the default before 0.2).
      corda_method: CorDA's ``"ipm"`` (adapt the directions the data uses most) or
        ``"kpm"`` (the least, keeping knowledge) [``corda_config.corda_method``].
      stable_gamma: LoRA-GA's ``B`` scale ``out^(1/4) / sqrt(stable_gamma)``
        [``lora_ga_config.stable_gamma``].
      loftq_iter: LoftQ's alternations of quantization and SVD
        [``loftq_config["loftq_iter"]``].
      layers_to_transform: adapt only these layer indices (the segment after a
        ``layers_pattern`` name: ``layers_3`` or ``layers/3``) [``layers_to_transform``];
        on a scanned stack (all layers in one array) the node's factors cover only
        those layers, and the other layers run the base alone.
      layers_pattern: the names of the layer-list segment; default ``LAYER_PATTERNS``
        [``layers_pattern``].
      exclude: paths left out even where ``targets`` match, in the same syntax (a regex,
        or a tuple of module names) [``exclude_modules``].
      modules_to_save: leaves trained in full beside the factors, in ``targets``' syntax (a
        tuple of module names selects every float leaf under them: kernel, bias, norm
        scale) [``modules_to_save``].
      trainable_token_indices: rows of embedding tables trained in place: ``{module name:
        [indices]}``, or a list of indices for the one 2-D leaf whose path contains
        ``embed`` [``trainable_token_indices``].
      alora_invocation_tokens: activated LoRA: the update acts only from the last
        occurrence of these tokens on, gated by ``apply``'s ``lora_mask``
        (``jlora.alora_mask``) [``alora_invocation_tokens``].

    Examples:
      >>> cfg = LoraConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
      >>> cfg.scaling_for(8, 16.0)
      2.0
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    init: str = "kaiming"
    dtype: Any = None
    exclude: str | tuple[str, ...] = ()
    loftq_iter: int = 1
    stable_gamma: float = 16.0
    corda_method: str = "ipm"
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    modules_to_save: str | tuple[str, ...] = ()
    trainable_token_indices: Mapping[str, tuple[int, ...]] | tuple[int, ...] | None = None
    alora_invocation_tokens: tuple[int, ...] | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> LoraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            raise TypeError(_unknown_fields(unknown, known))
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for name in ("targets", "exclude", "modules_to_save"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("exclude", "modules_to_save"):
            _check_spec(name, getattr(self, name))
        _check_tokens(self)
        _check_invocation(self)
        _check_rank("rank", self.rank)
        _check_alpha("alpha", self.alpha)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise LoraError(
                f"dropout={self.dropout!r} must be a float in [0, 1); common values are 0.05-0.1"
            )
        if isinstance(self.targets, str):
            _check_regex("targets", self.targets)
        elif not (
            isinstance(self.targets, tuple)
            and (self.targets or self.modules_to_save or self.trainable_token_indices)
            and all(isinstance(t, str) and t for t in self.targets)
        ):
            raise LoraError(
                f"targets={self.targets!r} must be a regex string or a non-empty "
                "tuple of module names such as ('q_proj', 'v_proj') (empty only "
                "with modules_to_save or trainable_token_indices)"
            )
        for key, r in dict(self.rank_pattern).items():
            _check_regex(f"rank_pattern key {key!r}", key)
            _check_rank(f"rank_pattern[{key!r}]", r)
        for key, a in dict(self.alpha_pattern).items():
            _check_regex(f"alpha_pattern key {key!r}", key)
            _check_alpha(f"alpha_pattern[{key!r}]", a)
        _check_layers(self)
        if (
            isinstance(self.loftq_iter, bool)
            or not isinstance(self.loftq_iter, int)
            or self.loftq_iter < 1
        ):
            raise LoraError(
                f"loftq_iter={self.loftq_iter!r} must be a positive int (PEFT's "
                "default is 1; the LoftQ paper uses up to 5)"
            )
        _check_init(self.init, self.stable_gamma, self.corda_method)

    def scaling_for(self, rank: int, alpha: float) -> float:
        """The factor ``s`` in ``W0 + s * A @ B`` for one leaf."""
        return scaling(alpha, rank, self.rslora)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LoraConfig:
        """A row of the source article's hyper-parameter table, with overrides.

        Names: ``quick`` (r8/a16 q,v), ``general`` (r16/a32 q,k,v,o),
        ``complex`` (r32/a64 all linear layers; r up to 64, alpha up to 128),
        ``constrained`` (r4/a8 q,v; r up to 8, alpha up to 16).

        Examples:
          >>> LoraConfig.preset("general").targets
          ('q_proj', 'k_proj', 'v_proj', 'o_proj')
        """
        if name not in PRESETS:
            raise LoraError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


#: PEFT's ``LoraConfig`` names of jlora's fields, for the error that names the right one.
PEFT_NAMES = {
    "r": "rank",
    "lora_alpha": "alpha",
    "target_modules": "targets",
    "lora_dropout": "dropout",
    "use_rslora": "rslora",
    "use_dora": "dora",
    "init_lora_weights": "init",
    "exclude_modules": "exclude",
}


def _unknown_fields(unknown: list[str], known: set[str]) -> str:
    said = [
        f"{k}= (PEFT's name for {PEFT_NAMES[k]}=)" if k in PEFT_NAMES else f"{k}=" for k in unknown
    ]
    return (
        f"LoraConfig got unknown fields {', '.join(said)}; jlora's fields are "
        f"{', '.join(sorted(known))}. To load a PEFT adapter (its adapter_config.json "
        "and weights), use jlora.peft.load(path, params)"
    )


def _check_spec(name: str, spec: Any) -> None:
    """``exclude``/``modules_to_save``: a regex string or a tuple of module names."""
    if isinstance(spec, str):
        _check_regex(name, spec)
    elif not (isinstance(spec, tuple) and all(isinstance(t, str) and t for t in spec)):
        raise LoraError(
            f"{name}={spec!r} must be a regex string or a tuple of "
            "module names such as ('lm_head',)"
        )


def _check_init(init: str, gamma: float, corda: str) -> None:
    if corda not in ("ipm", "kpm"):
        raise LoraError(f"corda_method={corda!r} must be 'ipm' or 'kpm' (PEFT's CorDA)")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise LoraError(f"stable_gamma={gamma!r} must be a positive number (PEFT's is 16)")
    if init_of(init) is None:
        raise LoraError(
            f"init={init!r} is not one of {tuple(INITS)} or 'pissa_niter_<K>' (PiSSA "
            "by randomized SVD with K subspace iterations, e.g. 'pissa_niter_4')"
        )


def _check_invocation(cfg: LoraConfig) -> None:
    t = cfg.alora_invocation_tokens
    if t is None:
        return
    if isinstance(t, list):
        object.__setattr__(cfg, "alora_invocation_tokens", t := tuple(t))
    if not (
        isinstance(t, tuple)
        and t
        and all(isinstance(v, int) and not isinstance(v, bool) for v in t)
    ):
        raise LoraError(
            f"alora_invocation_tokens={t!r} must be a non-empty tuple of token "
            "ids (the tokenized invocation string)"
        )
    if cfg.dora:
        raise LoraError(
            "alora_invocation_tokens with dora=True: an activated LoRA gates a "
            "low-rank term per token, and DoRA rescales the whole output (PEFT "
            "has no aLoRA DoRA either); choose one"
        )


def _check_rank(name: str, r: object) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoraError(f"{name}={r!r} must be a positive integer (e.g. 8 or 16)")


def _check_alpha(name: str, a: object) -> None:
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0 or not math.isfinite(a):
        raise LoraError(
            f"{name}={a!r} must be a positive finite number (alpha = 2*rank is a good start)"
        )


#: The source article's table (section 4.8), as keyword arguments of LoraConfig.
PRESETS: dict[str, dict] = {
    "quick": dict(rank=8, alpha=16.0, targets=("q_proj", "v_proj")),
    "general": dict(rank=16, alpha=32.0, targets=ATTENTION),
    "complex": dict(rank=32, alpha=64.0, targets=ALL_LINEAR),
    "constrained": dict(rank=4, alpha=8.0, targets=("q_proj", "v_proj")),
}


def _check_layers(cfg: LoraConfig) -> None:
    """Normalise ``layers_to_transform`` (an int or a list) and ``layers_pattern``."""
    layers, pattern = cfg.layers_to_transform, cfg.layers_pattern
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    if layers is not None:
        layers = tuple(layers) if isinstance(layers, (list, tuple)) else layers
        if not (
            isinstance(layers, tuple)
            and layers
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
        ):
            raise LoraError(
                f"layers_to_transform={cfg.layers_to_transform!r} must be a "
                "non-negative int or a non-empty list of them, e.g. [0, 1]"
            )
    if isinstance(pattern, str):
        pattern = (pattern,)
    if pattern is not None and not (
        isinstance(pattern, (list, tuple))
        and pattern
        and all(isinstance(p, str) and p for p in pattern)
    ):
        raise LoraError(
            f"layers_pattern={cfg.layers_pattern!r} must be a segment name such "
            "as 'layers' or a list of them"
        )
    object.__setattr__(cfg, "layers_to_transform", layers)
    object.__setattr__(cfg, "layers_pattern", None if pattern is None else tuple(pattern))


def _check_tokens(cfg: LoraConfig) -> None:
    """Normalise ``trainable_token_indices`` to ``{name: (i, ...)}`` (``""``: the list form)."""
    spec = cfg.trainable_token_indices
    if spec is None:
        return
    items = dict(spec).items() if isinstance(spec, Mapping) else [("", spec)]
    out = {}
    for name, idx in items:
        idx = tuple(idx) if isinstance(idx, (list, tuple)) else idx
        ok = (
            isinstance(name, str)
            and isinstance(idx, tuple)
            and idx
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idx)
        )
        if not ok or len(set(idx)) != len(idx):
            raise LoraError(
                f"trainable_token_indices={spec!r}: give a list of distinct "
                "non-negative token ids, or {module name: [ids]}, e.g. "
                "{'embed_tokens': [32000, 32001]}"
            )
        out[name] = idx
    object.__setattr__(cfg, "trainable_token_indices", out)
