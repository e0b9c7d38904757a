"""Key paths as strings, and which leaves a config targets."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import jax
import numpy as np

from jlora._src.config import LAYER_PATTERNS, LoraConfig, LoraError
from jlora._src.qnode import Quantized, is_quantized

#: A model's parameter pytree: any pytree of arrays (nested dicts from Flax or Haiku, an
#: Equinox module's array part, a penzai tree); quantized leaves allowed. Never modified.
#: JAX takes any registered pytree node, so the alias ends in ``object``: code that holds
#: one goes through the tree utilities, never indexes it.
Params: TypeAlias = jax.Array | Quantized | Mapping[Any, "Params"] | Sequence["Params"] | object
#: One leaf of a base: an array, or a quantized weight (a ``Quantized`` node).
Leaf = Any

_SHOW = 6  # how many example paths an error message lists
#: Leaf names a module-name target skips: they are added or scaled, never contracted.
_NOT_KERNELS = ("bias", "scale")
#: Leaf names of dense kernels laid out (in, out) (Flax, Haiku): a vocabulary is their last axis.
_VOCAB_LAST = ("kernel", "w")


def _segment(k: Any) -> str:
    tu = jax.tree_util
    if isinstance(k, tu.DictKey):
        return str(k.key)
    if isinstance(k, tu.GetAttrKey):
        return k.name
    if isinstance(k, tu.SequenceKey):
        return str(k.idx)
    if isinstance(k, tu.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(path: jax.tree_util.KeyPath) -> str:
    """The ``/``-joined path of a JAX key path: ``params/layers_0/attn/q_proj/kernel``.

    These are the paths a ``LoraConfig``'s regex targets match, :func:`jlora.explain`
    prints and :func:`jlora.adapter_nodes` keys by. A trailing ``.value`` (Flax NNX
    variables) is dropped.

    Args:
      path: a key path, as ``jax.tree_util.tree_flatten_with_path`` gives it.

    Returns:
      Each key's name (a dict key, an attribute, a sequence index) joined by ``/``.

    Examples:
      >>> import jax, jlora
      >>> [(kp, _)] = jax.tree_util.tree_flatten_with_path({"layers": [{"kernel": 1.0}]})[0]
      >>> jlora.path_str(kp)
      'layers/0/kernel'
    """
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_segment(k) for k in keys)


def flatten(tree: Any) -> tuple[list[tuple[jax.tree_util.KeyPath, Leaf]], jax.tree_util.PyTreeDef]:
    """``([(key_path, leaf), ...], treedef)``, a quantized node
    (:class:`~jlora._src.qnode.Quantized`) as one leaf."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)


def leaf_paths(tree: Any) -> list[str]:
    """Path strings of every leaf, in ``jax.tree.leaves`` order."""
    return [path_str(p) for p, _ in flatten(tree)[0]]


def matches(pattern: str | tuple[str, ...], path: str) -> bool:
    """Whether a target spec (regex, or tuple of exact segment names) selects ``path``."""
    if isinstance(pattern, str):
        return re.search(pattern, path) is not None
    segments = path.split("/")
    return any(name in segments for name in pattern)


def _examples(paths: Sequence[str]) -> str:
    shown = ", ".join(repr(p) for p in paths[:_SHOW])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > _SHOW else "")


def select(params: Params, cfg: LoraConfig) -> dict[str, tuple[int, float]]:
    """Map each targeted path to its ``(rank, alpha)``.

    Raises:
      LoraError: when the targets match nothing, match a leaf that is not at
        least 2-D, or a rank/alpha pattern matches no targeted path.
    """
    if cfg.targets == ():  # only modules_to_save / trainable_token_indices
        return {}
    flat = flatten(params)[0]
    paths = [path_str(p) for p, _ in flat]
    for field in ("targets", "exclude"):
        _check_names(field, getattr(cfg, field), paths)
    chosen = {}
    for path, (_, leaf) in zip(paths, flat, strict=True):
        if (
            not matches(cfg.targets, path)
            or (cfg.exclude and matches(cfg.exclude, path))
            or not _in_layers(cfg, path)
        ):
            continue
        if not _adaptable(cfg, path, leaf):
            continue
        chosen[path] = (
            _pattern_value(cfg.rank_pattern, path, cfg.rank),
            _pattern_value(cfg.alpha_pattern, path, cfg.alpha),
        )
    if not chosen:
        kernels = [p for p, (_, x) in zip(paths, flat, strict=True) if getattr(x, "ndim", 0) >= 2]
        left = f" outside exclude={cfg.exclude!r}" if cfg.exclude else ""
        raise LoraError(
            f"targets={cfg.targets!r} matched no parameter{left}; paths look "
            f"like {_examples(kernels or paths)}"
        )
    for name, pat in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        for key in pat:
            if not any(re.search(key, p) for p in chosen):
                raise LoraError(
                    f"{name} key {key!r} matches no targeted path; targeted "
                    f"paths are {_examples(list(chosen))}"
                )
    return chosen


def _adaptable(cfg: LoraConfig, path: str, leaf: Any) -> bool:
    """Whether a leaf the targets matched is a kernel to adapt: False for what a module
    name also selects (its bias, norms); a LoraError for a regex that matched a
    non-matrix or a non-float leaf."""
    ndim = getattr(leaf, "ndim", 0)
    if isinstance(cfg.targets, tuple) and (ndim < 2 or path.split("/")[-1] in _NOT_KERNELS):
        return False
    if ndim < 2:
        raise LoraError(
            f"targets={cfg.targets!r} matched {path!r} of shape "
            f"{getattr(leaf, 'shape', ())}, which is not a matrix; narrow "
            "the regex to kernels, e.g. 'q_proj/kernel'"
        )
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jax.dtypes.issubdtype(dtype, np.floating):
        raise LoraError(
            f"targets={cfg.targets!r} matched {path!r} of dtype {dtype}, not a "
            "floating point weight; narrow the targets to float kernels"
        )
    return True


def _check_names(field: str, names: Sequence[str], paths: list[str]) -> None:
    """Every literal module name in a tuple spec names a segment of some path (a regex
    spec is left alone): ``("q_porj", "v_proj")`` must not quietly adapt only ``v_proj``."""
    if isinstance(names, str):
        return
    segments = {s for p in paths for s in p.split("/")}
    missing = [n for n in names if n not in segments]
    if not missing:
        return
    near = {n: difflib.get_close_matches(n, sorted(segments), n=3) for n in missing}
    hints = "; ".join(
        f"{n!r}: did you mean {', '.join(map(repr, m))}?" if m else f"{n!r}: no similar name"
        for n, m in near.items()
    )
    raise LoraError(
        f"{field}={names!r}: {', '.join(map(repr, missing))} matched no "
        f"parameter ({hints}); paths look like {_examples(paths)}"
    )


def layer_index(path: str, patterns: Sequence[str] = LAYER_PATTERNS) -> int | str | None:
    """The layer index in ``path`` (``layers_3`` or ``layers/3``), ``"stack"`` when a layer
    segment has no index (a scanned stack), None when the path has no layer segment."""
    segs = path.split("/")
    for i, seg in enumerate(segs):
        m = re.fullmatch(rf"({'|'.join(map(re.escape, patterns))})_(\d+)", seg)
        if m:
            return int(m.group(2))
        if seg in patterns:
            return int(segs[i + 1]) if i + 1 < len(segs) and segs[i + 1].isdigit() else "stack"
    return None


def _in_layers(cfg: LoraConfig, path: str) -> bool:
    """Whether ``path`` is in ``cfg.layers_to_transform`` (always, when that is None; for
    a scanned stack, whose layers ``init`` then selects along its stacked axis)."""
    if cfg.layers_to_transform is None:
        return True
    idx = layer_index(path, cfg.layers_pattern or LAYER_PATTERNS)
    return idx == "stack" or idx in cfg.layers_to_transform  # a stack: init picks its layers


def _pattern_value(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
    for key, value in pattern.items():
        if re.search(key, path):
            return value
    return default


def _float(leaf: Leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, np.floating)


def select_whole(params: Params, cfg: LoraConfig) -> dict[str, tuple[int, ...] | None]:
    """The leaves ``cfg`` trains beside the factors: ``{path: None}`` for each leaf of
    ``modules_to_save`` (trained in full), ``{path: indices}`` for each table of
    ``trainable_token_indices``.

    Raises:
      LoraError: a spec that matches nothing, a token table that is ambiguous or too small.
    """
    flat = [(path_str(kp), leaf) for kp, leaf in flatten(params)[0]]
    out: dict[str, tuple[int, ...] | None] = {}
    if cfg.modules_to_save:
        _check_names("modules_to_save", cfg.modules_to_save, [p for p, _ in flat])
        full = [p for p, leaf in flat if matches(cfg.modules_to_save, p) and _float(leaf)]
        if not full:
            raise LoraError(
                f"modules_to_save={cfg.modules_to_save!r} matched no float "
                f"parameter; paths look like {_examples([p for p, _ in flat])}"
            )
        out.update(dict.fromkeys(full))
    tokens = cfg.trainable_token_indices or {}  # a mapping after LoraConfig.__post_init__
    for name, idx in tokens.items():  # type: ignore[union-attr]
        spec = name or "embed"  # the list form: the one table whose path says embed
        tables = [
            (p, leaf)
            for p, leaf in flat
            if matches(spec if not name else (name,), p)
            and _float(leaf)
            and getattr(leaf, "ndim", 0) >= 2
        ]
        if len(tables) != 1:
            raise LoraError(
                f"trainable_token_indices for {spec!r} must name exactly one "
                f"embedding table, but it matches {len(tables)}: "
                f"{_examples([p for p, _ in tables] or [p for p, _ in flat])}; "
                "pass {module name: [ids]}"
            )
        ((path, leaf),) = tables
        if path.split("/")[-1] in _VOCAB_LAST:  # rows of axis 0 would be features, silently
            raise LoraError(
                f"trainable_token_indices: {path!r} is a dense kernel (in, out), "
                "whose tokens are its last axis, not its rows; train token rows of "
                "the embedding table (vocab, d), which a tied head reads too"
            )
        if max(idx) >= leaf.shape[0]:
            raise LoraError(
                f"trainable_token_indices: token {max(idx)} is past the "
                f"{leaf.shape[0]} rows of {path!r}; resize the table first"
            )
        out[path] = idx
    return out
