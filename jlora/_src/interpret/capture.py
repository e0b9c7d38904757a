"""Capture mode: the statistics of each adapted weight's inputs, for data-driven inits (EVA).

Run under a :class:`Capture`, the ``dot_general`` rule computes only the base product
and adds the rows that met each adapted weight (every axis of the input it does not
contract, flattened; the contracted ones in the adapter's in-axis order) to that
weight's running ``(count, sum, gram, top)`` (``top``: the largest entry, CorDA's
normalizer). Inside a ``scan`` or ``checkpoint`` body the
statistics leave as extra outputs (:func:`body_outputs`), so a scanned stack gets one
set per layer, leading like the stack axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora._src.config import LoraError

if TYPE_CHECKING:
    from jlora._src.interpret.sym import Sym
from jlora._src.interpret.grouped import in_rows

#: Statistics per adapted path: ``(count, sum, gram, top)``.
STATS = 4


@dataclasses.dataclass
class Capture:
    """``mask``: optional bool array shaped like the inputs' non-contracted axes (e.g.
    ``(batch, seq)``), False for rows to leave out (padding). ``stats``: path -> the
    running ``(count, sum (K,), gram (K, K), top ())`` in float32."""

    mask: Any = None
    stats: dict = dataclasses.field(default_factory=dict)

    def fresh(self) -> Capture:
        return Capture(self.mask)


def add(
    cap: Capture,
    sym: Sym,
    x: jax.Array,
    xc: Sequence[int],
    wc: Sequence[int],
    xb: Sequence[int],
    wb: Sequence[int],
) -> None:
    """Add the rows of ``x`` that meet ``sym`` (contracting ``xc`` with its ``wc``)."""
    if (
        xb
        or wb
        or sym.count("s")
        or any(sym.labels[a][0] != "i" for a in wc)
        or len(wc) != sym.count("i")
    ):
        raise LoraError(
            f"EVA needs the inputs of {sym.path!r} as rows against all its in axes, but the "
            "model contracts it another way (batched, over stacked axes not sliced by a scan, "
            "or on its out axes); leave it out of the targets for init_eva"
        )
    rows, free = in_rows(x, sym, xc, wc)
    rows = rows.astype(jnp.float32)
    keep = jnp.ones((rows.shape[0],), jnp.float32)
    if cap.mask is not None:
        free_shape = tuple(x.shape[a] for a in free)
        if tuple(cap.mask.shape) != free_shape:
            raise LoraError(
                f"the EVA mask has shape {tuple(cap.mask.shape)}, but the input "
                f"of {sym.path!r} has rows {free_shape}; give a mask shaped like "
                "the inputs' non-contracted axes, e.g. (batch, seq)"
            )
        keep = cap.mask.reshape(-1).astype(jnp.float32)
    kept = rows * keep[:, None]
    new = (
        keep.sum(),
        kept.sum(0),
        lax.dot_general(kept, rows, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST),
        jnp.max(jnp.where(keep[:, None] > 0, rows, -jnp.inf)),
    )
    _accumulate(cap, sym.path, new)


def flat(inner: Capture | None, keys: list) -> list:
    """A loop body's statistics as a flat list of outputs; ``keys`` receives their paths."""
    if inner is None:
        return []
    keys[:] = list(inner.stats)
    return [v for k in keys for v in inner.stats[k]]


def merge(cap: Capture | None, keys: list, extra: Sequence[jax.Array]) -> None:
    """Add a loop's stacked statistics (``flat``'s outputs after the loop) to ``cap``."""
    if cap is None:  # not in capture mode: no statistics (and no keys)
        return
    for i, k in enumerate(keys):
        _accumulate(cap, k, tuple(extra[STATS * i : STATS * (i + 1)]))


def _accumulate(cap: Capture, path: str, new: tuple) -> None:
    old = cap.stats.get(path)
    cap.stats[path] = (
        new
        if old is None
        else (*(o + n for o, n in zip(old[:3], new[:3], strict=True)), jnp.maximum(old[3], new[3]))
    )
