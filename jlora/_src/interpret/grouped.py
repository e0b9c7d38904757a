"""The grouped path of a mixed-adapter batch: rows sorted by adapter, two ``ragged_dot``s.

S-LoRA/Punica's layout. The per-example path (``dot._low_rank``) gathers each
example's factors, so its traffic grows with the examples (``E (K + N) r``); this
one reads each adapter's factors once and moves the rows instead (``T (K + N)``):
it flattens ``x`` to ``(T, K)`` rows, sorts them by adapter id (a stable sort,
group sizes from ``bincount``), runs ``ragged_dot(x, A)`` and ``ragged_dot(t, B)``
and puts the rows back. Rows of id ``-1`` run with adapter 0 and are zeroed.

It covers the common use: the model contracts all in-axes, no dot batch axes and no
stacked-layer axes left in the weight (a scan has sliced them off); anything else,
and DoRA, takes the per-example path. ``mixed="auto"`` picks grouped only off the
CPU and only for decode-shaped inputs (fewer rows per example than the rank: the
gathered factors would outweigh the rows). On the CPU the two products run as masked
dense products (:func:`ragged_low_rank`), still many times the gather there
(``benchmarks/grouped_cpu.py``), so auto never picks the grouped path on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from jlora._src.interpret.sym import Sym
from jlora._src.interpret.thin import thin

MODES = ("auto", "gather", "grouped", "onehot")
#: Platforms where :func:`ragged_low_rank` masks a dense product instead of ``ragged_dot``.
DENSE_ON = ("cpu",)


def ragged_low_rank(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    sizes: jax.Array,
    scale: float | jax.Array,
    prec: Any,
    out_sharding: Any = None,
) -> jax.Array:
    """``scale * ragged_dot(ragged_dot(x, a, sizes), b, sizes)``: rows ``x (T, K)`` in runs
    of ``sizes`` (rows past them get zeros), each run its group's ``a (n, K, r)`` and
    ``b (n, r, N)``.

    On the CPU JAX lowers ``ragged_dot`` to one product against all groups' weights
    with the input replicated per group and masked (``(T, n K)`` for ``x a``). Here the
    rank-``r`` intermediate is masked instead: ``x`` times all ``a`` side by side, each
    row keeping its group's ``r`` columns, times all ``b`` stacked. The same FLOPs
    without the replicated input (``benchmarks/grouped_cpu.py``); both products are
    :func:`jlora._src.interpret.thin.thin`. Elsewhere ``ragged_dot`` runs per group;
    ``out_sharding``: the model's own product's (an explicit mesh needs it named), which
    the rank-``r`` intermediate takes along its rows.
    """
    if jax.default_backend() not in DENSE_ON:
        rows = _rows_only(out_sharding)
        t = lax.ragged_dot(x, a, sizes, precision=prec, out_sharding=rows)
        t = t if scale == 1.0 else t * jnp.asarray(scale, t.dtype)
        return lax.ragged_dot(t, b, sizes, precision=prec, out_sharding=out_sharding)
    return onehot_low_rank(x, a, b, row_groups(sizes, x.shape[0]), scale, prec)


def _rows_only(sharding: Any) -> Any:
    """``sharding`` (a ``PartitionSpec`` or ``NamedSharding`` of ``(rows, out)``, or None)
    with its column axis whole."""
    if sharding is None:
        return None
    spec = getattr(sharding, "spec", sharding)
    rows = PartitionSpec(spec[0] if len(spec) else None, None)
    return rows if isinstance(sharding, PartitionSpec) else NamedSharding(sharding.mesh, rows)


def row_groups(sizes: jax.Array, rows: int) -> jax.Array:
    """The group of each of ``rows`` rows laid out in runs of ``sizes`` (``len(sizes)``
    for rows past them)."""
    return jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(rows), side="right")


def onehot_low_rank(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    row_ids: jax.Array,
    scale: float | jax.Array,
    prec: Any,
) -> jax.Array:
    """The one-hot contraction (sglang-jax's ``einsum("td,tX,Xld->tl")``): every row
    ``x (T, K)`` against every adapter's ``a (n, K, r)``, each row keeping its own
    adapter's ``r`` columns (a one-hot of ``row_ids``; id -1 keeps none), times all ``b``
    stacked. No sort and no gather: dense products of ``n`` times the rank-``r`` FLOPs."""
    keep = jax.nn.one_hot(row_ids, a.shape[0], dtype=a.dtype) * jnp.asarray(scale, a.dtype)
    t = thin("tk,gkr->tgr", prec, x, a) * keep[:, :, None]
    return thin("tgr,grn->tn", prec, t, b)


def applies(sym: Sym, mode: str, dims: tuple) -> bool:
    """Whether the grouped path can run this use (contracting in-axes, no batch or
    stacked axes, no DoRA)."""
    _, _, xb, wb = dims
    return (
        mode == "i"
        and not xb
        and not wb
        and sym.g is None
        and sym.count("s") == 0
        and sym.ids is not None
    )


def chosen(choice: str, x: jax.Array, sym: Sym, ex_axis: int) -> str:
    """``choice`` resolved for this use: ``"gather"``, ``"grouped"`` or ``"onehot"``."""
    if choice != "auto":
        return choice
    rows_per_example = x.size // x.shape[ex_axis] // math.prod(sym.a.shape[1:-1])
    decode = jax.default_backend() != "cpu" and rows_per_example < sym.a.shape[-1]
    return "grouped" if decode else "gather"


def in_rows(
    x: jax.Array, sym: Sym, xc: Sequence[int], wc: Sequence[int], first: int | None = None
) -> tuple[jax.Array, list[int]]:
    """``(rows, free)``: ``x`` as ``(rows, K)``, its contracted axes last in ``A``'s in-axis
    order, the others (``first`` leading) flattened into rows in the order ``free``."""
    order = sorted(range(len(wc)), key=lambda k: sym.labels[wc[k]][1])
    xc = [xc[k] for k in order]
    free = [ax for ax in range(x.ndim) if ax not in xc]
    if first is not None:
        free = [first] + [ax for ax in free if ax != first]
    k = math.prod(x.shape[ax] for ax in xc)
    return jnp.transpose(x, free + xc).reshape(-1, k), free


def low_rank(
    x: jax.Array,
    sym: Sym,
    sym_is_rhs: bool,
    dims: tuple,
    examples: tuple,
    prec: Any,
    onehot: bool = False,
) -> jax.Array:
    """``(x A) B`` per row's adapter, laid out like the dot's output (rows of id -1 zero):
    rows sorted by adapter (``ragged_low_rank``) or, ``onehot``, in place
    (``onehot_low_rank``).

    ``examples`` is ``(ex_axis, ids)``: ``ids`` gives the adapter of each index along
    ``x``'s axis ``ex_axis``."""
    ex_axis, ids = examples
    xc, wc, _, _ = dims
    rows, order = in_rows(x, sym, xc, wc, first=ex_axis)
    free, rest = sorted(order), order[1:]
    n, r = sym.a.shape[0], sym.a.shape[-1]
    row_ids = jnp.repeat(ids, math.prod(x.shape[a] for a in rest))
    a = sym.a.reshape(n, -1, r)
    b = sym.b.reshape(n, r, -1)
    if onehot:
        y = onehot_low_rank(rows.astype(a.dtype), a, b, row_ids, sym.scale, prec)
    else:
        y = _sorted(rows.astype(a.dtype), a, b, row_ids, sym.scale, prec)
    return _lay_out(y, x, sym, sym_is_rhs, wc, (ex_axis, free, rest))


def _sorted(
    rows: jax.Array,
    a: jax.Array,
    b: jax.Array,
    row_ids: jax.Array,
    scale: float | jax.Array,
    prec: Any,
) -> jax.Array:
    """Rows sorted by adapter, the two products per group, the rows put back."""
    used = row_ids >= 0
    order = jnp.argsort(jnp.maximum(row_ids, 0), stable=True)
    sizes = jnp.bincount(jnp.maximum(row_ids, 0), length=a.shape[0]).astype(jnp.int32)
    y_sorted = ragged_low_rank(rows[order], a, b, sizes, scale, prec)
    back = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return jnp.where(used[:, None], y_sorted[back], jnp.zeros((), y_sorted.dtype))


def _lay_out(
    y: jax.Array, x: jax.Array, sym: Sym, sym_is_rhs: bool, wc: Sequence[int], x_axes: tuple
) -> jax.Array:
    """``y (rows, out)`` laid out like the dot's output; ``x_axes`` is ``(ex_axis, free,
    rest)``: x's example axis, its free axes, and those of them after the example axis."""
    ex_axis, free, rest = x_axes
    out_axes = [ax for ax in range(sym.base.ndim) if ax not in wc]  # the weight's free axes
    out_labels = sorted(out_axes, key=lambda ax: sym.labels[ax][1])
    y = y.reshape(
        [x.shape[ex_axis]] + [x.shape[a] for a in rest] + [sym.base.shape[a] for a in out_labels]
    )
    have = [("x", ex_axis)] + [("x", a) for a in rest] + [("w", a) for a in out_labels]
    want = [("x", a) for a in free] + [("w", a) for a in out_axes]
    if not sym_is_rhs:
        want = want[len(free) :] + want[: len(free)]
    return jnp.transpose(y, [have.index(w) for w in want])
