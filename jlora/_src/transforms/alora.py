"""Activated LoRA (PEFT's aLoRA): an update that acts only from an invocation sequence on.

``jlora.apply(fn)(params, adapter, *args, lora_mask=mask)`` gates the low-rank path of
every adapted use per token (:mod:`jlora._src.interpret.token_axes` follows the mask's axes
to each use); :func:`alora_mask` computes PEFT's activation from the input ids. Before
the invocation every row equals the base's, so all adapters share the base's KV cache
for the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jlora._src.adapter import Adapter, StackedNode, adapter_nodes, is_node, is_whole
from jlora._src.config import LoraError
from jlora._src.interpret.uses import Use


def alora_mask(
    input_ids: ArrayLike, invocation_tokens: Any, adapter_ids: ArrayLike | None = None
) -> jax.Array:
    """PEFT's aLoRA activation: True from the start of the last occurrence of the
    invocation sequence on; a row without one is all False (the base alone).

    Args:
      input_ids: ``(batch, seq)`` (or ``(seq,)``) integer token ids.
      invocation_tokens: the invocation sequence (ints); or one entry per row (a
        sequence, or None for a row served by a plain adapter: all True); or an adapter
        tree, whose nodes' ``invocation`` is used (a stacked one needs ``adapter_ids``).
      adapter_ids: with a stacked adapter, each row's adapter (``apply``'s).

    Returns:
      A boolean array shaped like ``input_ids``, for ``apply``'s ``lora_mask``. Decode
      steps continue a row's last prompt entry: ``mask[:, -1:]``.

    Raises:
      TypeError: ids that are not integers, invocation tokens that are not ints.
      ValueError: an empty invocation sequence, a per-row list of the wrong length.
      LoraError: an adapter with no activated-LoRA node, or nodes that disagree.

    Examples:
      >>> jlora.alora_mask(jnp.array([[5, 1, 2, 7, 1, 2, 9], [5, 6, 7, 8, 9, 9, 9]]), [1, 2])
      Array([[False, False, False, False,  True,  True,  True],
             [False, False, False, False, False, False, False]], dtype=bool)
    """
    ids = jnp.asarray(input_ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim not in (1, 2):
        raise TypeError(
            f"alora_mask(input_ids=...): expected (batch, seq) integer token ids, "
            f"got {ids.dtype} of shape {ids.shape}"
        )
    rows = ids[None] if ids.ndim == 1 else ids
    if is_node(invocation_tokens) or isinstance(invocation_tokens, dict):
        mask = _from_adapter(rows, invocation_tokens, adapter_ids)
    elif _is_tokens(invocation_tokens):
        mask = _activated(rows, _tokens(invocation_tokens, "invocation_tokens"))
    else:
        per_row = list(invocation_tokens)
        if len(per_row) != rows.shape[0]:
            raise ValueError(
                f"alora_mask: {len(per_row)} invocation sequences for "
                f"{rows.shape[0]} rows; give one per row (None: a plain adapter)"
            )
        masks = [
            jnp.ones(rows.shape[1:], bool)
            if t is None
            else _activated(rows[i : i + 1], _tokens(t, f"invocation_tokens[{i}]"))[0]
            for i, t in enumerate(per_row)
        ]
        mask = jnp.stack(masks)
    return mask[0] if ids.ndim == 1 else mask


def _is_tokens(t: object) -> bool:
    return (
        isinstance(t, (Sequence, np.ndarray, jax.Array))
        and all(isinstance(v, (int, np.integer)) or (hasattr(v, "ndim") and v.ndim == 0) for v in t)
        and len(t) > 0
    )


def _tokens(t: Any, name: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in np.asarray(t).reshape(-1)) if len(t) else ()
    except (TypeError, ValueError):
        raise TypeError(f"alora_mask: {name} must be a sequence of token ids, got {t!r}") from None
    if not out:
        raise ValueError(
            f"alora_mask: {name} is empty; an activated LoRA needs at least one invocation token"
        )
    return out


def _activated(rows: jax.Array, toks: tuple[int, ...]) -> jax.Array:
    """``(batch, seq)``: positions at or after the last full occurrence of ``toks``."""
    n, length = rows.shape[1], len(toks)
    if length > n:
        return jnp.zeros(rows.shape, bool)
    found = jnp.ones((rows.shape[0], n - length + 1), bool)
    for j, t in enumerate(toks):
        found &= rows[:, j : n - length + 1 + j] == t
    start = jnp.max(jnp.where(found, jnp.arange(n - length + 1)[None], -1), axis=1, keepdims=True)
    return (jnp.arange(n)[None] >= start) & (start >= 0)


def _from_adapter(rows: jax.Array, adapter: Adapter, adapter_ids: ArrayLike | None) -> jax.Array:
    nodes = list(adapter_nodes(adapter).values())
    stacked = [n for n in nodes if isinstance(n, StackedNode)]
    if stacked:
        if adapter_ids is None:
            raise LoraError("alora_mask of a stacked adapter needs adapter_ids (each row's)")
        each = {n.invocations or (None,) * len(n.ranks) for n in stacked}
        tokens = each.pop()
        if each or not any(tokens):
            raise LoraError(
                "alora_mask: the stacked adapter holds no activated LoRA, or "
                "its nodes disagree on the invocation tokens"
            )
        masks = jnp.stack(
            [jnp.ones(rows.shape, bool) if t is None else _activated(rows, t) for t in tokens]
        )
        pick = jnp.clip(jnp.asarray(adapter_ids), 0, len(tokens) - 1)
        return masks[pick, jnp.arange(rows.shape[0])]
    found = {getattr(n.lora, "invocation", None) for n in nodes}
    if len(found) != 1 or None in found:
        raise LoraError(
            f"alora_mask: the adapter's nodes hold invocation tokens {found}; "
            "expected one activated LoRA (PEFT's alora_invocation_tokens)"
        )
    only = found.pop()
    assert only is not None
    return _activated(rows, only)


def check_mask(nodes: list, mask: ArrayLike | None) -> None:
    """``apply``'s ``lora_mask``: required by an activated LoRA, and gating LoRA nodes only."""
    active = [
        n
        for n in nodes
        if n is not None and (getattr(n.lora, "invocation", None) or getattr(n, "invocations", ()))
    ]
    if mask is None:
        if active:
            raise LoraError(
                "this adapter is an activated LoRA (its nodes hold invocation "
                "tokens): it acts only from the invocation on, so apply needs "
                "lora_mask=jlora.alora_mask(input_ids, adapter)"
            )
        return
    dtype = getattr(mask, "dtype", None)
    if (
        dtype is None
        or not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.floating))
        or np.ndim(mask) < 1
    ):
        raise TypeError(
            f"lora_mask must be a bool or float array (one entry per token, e.g. "
            f"(batch, seq)), got {dtype} of shape {np.shape(mask)}"
        )
    whole = [type(n).__name__ for n in nodes if is_whole(n)]
    if whole:
        raise LoraError(
            f"lora_mask gates low-rank updates per token, but the adapter holds "
            f"{sorted(set(whole))} (whole trained leaves), which it cannot gate; "
            "merge those into the base first"
        )


def ungated(records: dict) -> None:
    """Raise if an adapted use was not gated per token (materialized, a lookup, a conv)."""
    for path, uses in records.items():
        bad = [str(u) for u in uses if isinstance(u, Use) and not u.gated]
        if bad:
            raise LoraError(
                f"lora_mask gates each adapted use per token, but {path!r} is "
                f"used as {bad[0]!r}, where a per-token gate cannot apply; "
                "serve it without lora_mask, or change how the model uses it"
            )
