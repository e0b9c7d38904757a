"""The ``gather`` rule: an embedding lookup of an adapted table, computed factored.

For a table ``E0 (vocab, d)`` adapted as ``E0 + s A B`` with ``A (vocab, r)``
and ``B (r, d)`` (the indexed axis is "in", as PEFT's ``Embedding`` LoRA has
it), ``E[ids] = E0[ids] + s A[ids] B``: the same gather on ``A`` (rank-r rows)
and one thin product. Its gradient scatters into ``(vocab, r)`` only; no
table-sized array is formed. PEFT applies no dropout to an embedding's LoRA
path and neither does this rule. Other gathers (of an out axis, partial
slices, a stacked or DoRA table, a mixed-adapter batch) materialize the weight
for that use and say why.
"""

from __future__ import annotations


from jax import lax

from jlora.interpret import sym as sy
from jlora.interpret.core import materialized, register
from jlora.interpret.sym import Sym
from jlora.numerics import qview as qv


def _indexed(sym: Sym, params) -> tuple | None:
    """The operand axes a gather indexes (collapsed or sliced short), or None when it is
    not a lookup of whole slices along the others (operand batching dims, e.g.)."""
    dn, sizes = params["dimension_numbers"], params["slice_sizes"]
    if tuple(getattr(dn, "operand_batching_dims", ())):
        return None
    shape = sym.base.shape
    return tuple(ax for ax in range(len(shape))
                 if ax in dn.collapsed_slice_dims or sizes[ax] < shape[ax])


def _why_not(sym: Sym, axes) -> str | None:
    if not axes:
        return "gather that is not a row lookup"
    if sym.ids is not None:
        return "gather in a mixed-adapter batch"
    if sym.g is not None:
        return "gather of a DoRA table"
    kinds = {sym.labels[ax][0] for ax in axes}
    if kinds == {"o"}:
        return "gather along the table's out axis"
    if kinds != {"i"}:
        return "gather that is not a row lookup"
    if sym.count("s") or sym.count("o") != 1:
        return "gather of a stacked or multi-axis table"
    return None


@register(lax.gather_p)
def gather(eqn, invals, ctx):
    operand, indices = invals
    params = eqn.params
    if not isinstance(operand, Sym) or isinstance(indices, (Sym, qv.QView)):
        return lax.gather_p.bind(*materialized(invals, ctx, "gather"), **params)
    axes = _indexed(operand, params)
    base_out = sy.on_base(operand.base, lax.gather_p, indices, **params)
    if operand.probe:
        if axes:
            ctx.record(operand.path, ("gather", tuple(operand.labels[ax][1] for ax in axes)))
        return base_out
    why = _why_not(operand, axes)
    if why is not None:
        w = sy.materialize(operand, ctx.record, why)
        return lax.gather_p.bind(w, indices, **params)
    ctx.record(operand.path, "factored")
    return base_out + _low_rank_rows(operand, indices, params).astype(base_out.dtype)


def _low_rank_rows(sym: Sym, indices, params):
    """``s A[ids] B`` laid out like the lookup's output."""
    out_ax = next(ax for ax, (k, _) in enumerate(sym.labels) if k == "o")
    a = sy.a_as_base(sym)
    sizes = list(params["slice_sizes"])
    sizes[out_ax] = a.shape[out_ax]
    rows = lax.gather_p.bind(a, indices, **{**params, "slice_sizes": tuple(sizes)})
    dn = params["dimension_numbers"]
    kept = [ax for ax in range(len(sym.labels)) if ax not in dn.collapsed_slice_dims]
    return sy.times_b(sym, rows, dn.offset_dims[kept.index(out_ax)])  # where out lands
