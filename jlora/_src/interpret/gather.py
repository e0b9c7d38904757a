"""The ``gather`` rule: an embedding lookup of an adapted table, computed factored.

For a table ``E0 (vocab, d)`` adapted as ``E0 + s A B`` with ``A (vocab, r)``
and ``B (r, d)`` (the indexed axis is "in", as PEFT's ``Embedding`` LoRA has
it), ``E[ids] = E0[ids] + s A[ids] B``: the same gather on ``A`` (rank-r rows)
and one thin product. Its gradient scatters into ``(vocab, r)`` only; no
table-sized array is formed. PEFT applies no dropout to an embedding's LoRA
path and neither does this rule. DoRA scales each embedding feature by
``g = m / ||E0 + s A B||`` (the norm over the vocabulary, PEFT's
``DoraEmbeddingLayer``).

A gather that picks whole slices along stacked axes only (``jnp.take(w, i,
axis=0)`` of a ``(layers, in, out)`` kernel, any index shape) keeps the weight
symbolic: the same gather picks the factors' slices. Other gathers (of an out
axis, partial slices, a stacked table looked up by rows, a mixed-adapter batch)
materialize the weight for that use and say why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import lax
from jax.extend.core import JaxprEqn

from jlora._src.interpret import sym as sy
from jlora._src.interpret.core import Ctx, materialized, register
from jlora._src.interpret.sym import Probe, Sym
from jlora._src.interpret.uses import FACTORED
from jlora._src.numerics import qview as qv


def _indexed(sym: Sym, params: dict) -> tuple | None:
    """The operand axes a gather indexes (collapsed or sliced short), or None when it is
    not a lookup of whole slices along the others (operand batching dims, e.g.)."""
    dn, sizes = params["dimension_numbers"], params["slice_sizes"]
    if tuple(getattr(dn, "operand_batching_dims", ())):
        return None
    shape = sym.base.shape
    return tuple(
        ax for ax in range(len(shape)) if ax in dn.collapsed_slice_dims or sizes[ax] < shape[ax]
    )


def _why_not(sym: Sym, axes: tuple | None) -> str | None:
    if not axes:
        return "gather that is not a row lookup"
    if sym.ids is not None:
        return "gather in a mixed-adapter batch"
    kinds = {sym.labels[ax][0] for ax in axes}
    if kinds == {"o"}:
        return "gather along the table's out axis"
    if kinds == {"s"}:
        return (
            "gather of stacked slices that also indexes other axes or fills "
            "out-of-range slices with a value other than 0 or NaN"
        )
    if kinds != {"i"}:
        return "gather that is not a row lookup"
    if sym.count("s") or sym.count("o") != 1:
        return "gather of a stacked or multi-axis table"
    return None


@register(lax.gather_p, on=Probe)
def _probe_gather(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """A probed weight gathered: whole slices of one axis of a 3+-D kernel picked (layers,
    or a table's rows: the probe goes on, that axis a new stacked one), or rows looked up
    (the indexed axes recorded; the result is plain)."""
    operand, indices = invals
    params = eqn.params
    if not isinstance(operand, Probe) or isinstance(indices, (Sym, qv.QView)):
        return gather(eqn, invals, ctx)
    axes, dn = _indexed(operand, params), params["dimension_numbers"]
    base = sy.on_base(operand.base, lax.gather_p, indices, **params)
    if not axes:
        return base
    whole = all(ax in axes for ax in dn.start_index_map) and operand.base.ndim >= 3
    if whole and len(axes) == 1 and tuple(dn.collapsed_slice_dims) == axes:
        ctx.record(operand.path, ("pick", operand.labels[axes[0]][1]))
        kept = [lab for ax, lab in enumerate(operand.labels) if ax != axes[0]]
        labels = [
            kept.pop(0) if pos in dn.offset_dims else operand.labels[axes[0]]
            for pos in range(indices.ndim - 1 + operand.base.ndim - 1)
        ]
        return operand.replace(base=base, labels=tuple(labels))
    ctx.record(operand.path, ("gather", tuple(operand.labels[ax][1] for ax in axes)))
    return base


@register(lax.gather_p)
def gather(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    operand, indices = invals
    params = eqn.params
    if not isinstance(operand, Sym) or isinstance(indices, (Sym, qv.QView)):
        return lax.gather_p.bind(*materialized(invals, ctx, "gather"), **params)
    axes = _indexed(operand, params)
    picked = _pick(operand, indices, params, axes, ctx.record)
    if picked is not None:
        return picked
    base_out = sy.on_base(operand.base, lax.gather_p, indices, **params)
    sy.check_assumed(operand, params["dimension_numbers"].collapsed_slice_dims)  # looked up
    why = _why_not(operand, axes)
    if why is not None:
        w = sy.materialize(operand, ctx.record, why)
        return lax.gather_p.bind(w, indices, **params)
    ctx.record(operand.path, FACTORED)
    y, out_ax = _low_rank_rows(operand, indices, params)
    if operand.g is None:
        return base_out + y.astype(base_out.dtype)
    g = operand.g.reshape([-1 if ax == out_ax else 1 for ax in range(y.ndim)])
    return (g * (base_out + y)).astype(base_out.dtype)


def _low_rank_rows(sym: Sym, indices: jax.Array, params: dict) -> tuple[jax.Array, int]:
    """``s A[ids] B`` laid out like the lookup's output, and where its out axis lands."""
    out_ax = next(ax for ax, (k, _) in enumerate(sym.labels) if k == "o")
    a = sy.a_as_base(sym)
    sizes = list(params["slice_sizes"])
    sizes[out_ax] = a.shape[out_ax]
    rows = lax.gather_p.bind(a, indices, **{**params, "slice_sizes": tuple(sizes)})
    dn = params["dimension_numbers"]
    kept = [ax for ax in range(len(sym.labels)) if ax not in dn.collapsed_slice_dims]
    at = dn.offset_dims[kept.index(out_ax)]
    return sy.times_b(sym, rows, at), at


def _pick(
    sym: Sym,
    indices: jax.Array,
    params: dict,
    axes: tuple | None,
    record: Callable[[str, Any], None],
) -> Sym | None:
    """Whole slices along stacked axes (``jnp.take(w, i, axis=0)`` of a layer stack): the
    weight stays symbolic, its factors (and DoRA's ``g``) gathered alike; the indices'
    batch axes become new stacked axes. None when the gather is not such a pick, or when
    its fill value would not be filled consistently (merged: ``c``; factored:
    ``c + s c c``); only 0 and NaN (jnp's default) fill both alike."""
    dn = params["dimension_numbers"]
    nb = indices.ndim - 1  # the index vector is the indices' last axis
    if not axes or any(ax not in axes for ax in dn.start_index_map):
        return None
    fill = params.get("fill_value")
    if (
        sym.ids is not None
        or any(sym.labels[ax][0] != "s" for ax in axes)
        or (
            params["mode"] == lax.GatherScatterMode.FILL_OR_DROP
            and fill is not None
            and fill == fill
            and fill != 0
        )
    ):
        return None
    stack = {sym.labels[ax][1]: ax for ax in range(sym.base.ndim) if sym.labels[ax][0] == "s"}

    def factor(f: jax.Array | None) -> jax.Array | None:
        return None if f is None else _gather_factor(f, stack, indices, params)

    return sym.replace(
        base=sy.on_base(sym.base, lax.gather_p, indices, **params),
        a=factor(sym.a),
        b=factor(sym.b),
        g=factor(sym.g),
        labels=_picked_labels(sym, dn, nb),
    )


def _gather_factor(f: jax.Array, stack: dict, indices: jax.Array, params: dict) -> jax.Array:
    """The same pick on a factor whose leading axes are the weight's stacked ones (in
    order): the indices' batch axes first, then the factor's kept axes in order."""
    dn, sizes = params["dimension_numbers"], params["slice_sizes"]
    fs = [sizes[stack[d]] if d in stack else n for d, n in enumerate(f.shape)]
    to_f = {ax: d for d, ax in stack.items()}
    collapsed = tuple(sorted(to_f[ax] for ax in dn.collapsed_slice_dims))
    nb = indices.ndim - 1
    fdn = lax.GatherDimensionNumbers(
        offset_dims=tuple(range(nb, nb + f.ndim - len(collapsed))),
        collapsed_slice_dims=collapsed,
        start_index_map=tuple(to_f[ax] for ax in dn.start_index_map),
    )
    return lax.gather_p.bind(
        f, indices, **{**params, "dimension_numbers": fdn, "slice_sizes": tuple(fs)}
    )


def _picked_labels(sym: Sym, dn: Any, nb: int) -> tuple:
    """The output's labels: the indices' batch axes stacked first (0..nb-1), the kept
    stacked axes after them in order, in and out axes as they were."""
    kept = [ax for ax in range(sym.base.ndim) if ax not in dn.collapsed_slice_dims]
    kept_s = sorted(sym.labels[ax][1] for ax in kept if sym.labels[ax][0] == "s")
    out, batch = [], 0
    for pos in range(nb + len(kept)):
        if pos in dn.offset_dims:
            kind, idx = sym.labels[kept[list(dn.offset_dims).index(pos)]]
            out.append((kind, nb + kept_s.index(idx)) if kind == "s" else (kind, idx))
        else:
            out.append(("s", batch))
            batch += 1
    return tuple(out)
