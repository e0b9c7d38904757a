"""Rules for layout ops that commute with the factorisation: the weight stays symbolic.

``transpose``, ``convert_element_type``, ``squeeze``, ``slice``, ``dynamic_slice``,
size-1 ``broadcast_in_dim``, ``reshape`` (merges and splits of adjacent axes of one
kind) and ``copy`` update base, factors and labels together, so indexing one layer
of a stacked kernel stays factored. On a quantized view they narrow or defer
(:mod:`jlora.interpret.quantized`). Anything they cannot express materializes.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jlora.interpret import quantized
from jlora.interpret import sym as sy
from jlora.interpret.core import bind_params, has_sym, materialize_rule, register
from jlora.interpret.sym import Label, Sym
from jlora.numerics import qview as qv


def _layout_rule(on_sym: Callable | None):
    """The rule of one layout primitive: ``on_sym(sym, operands, params, ctx)`` for an
    adapted weight (None: not expressible), deferral for a quantized one."""
    def rule(eqn, invals, ctx):
        x, rest = invals[0], invals[1:]
        if not has_sym(rest):
            if isinstance(x, Sym) and on_sym is not None:
                out = on_sym(x, rest, eqn.params, ctx)
                if out is not None:
                    return out
            if qv.is_view(x):
                return quantized.op(x, eqn.primitive, rest, bind_params(eqn)[1])
        return materialize_rule(eqn, invals, ctx)
    return rule


def _factor_axis(sym: Sym, label: Label) -> list[tuple[str, int]]:
    """Which (factor, dim) pairs hold the axis with this label."""
    kind, idx = label
    ns, k = sym.count("s"), sym.lead
    if kind == "s":
        return [("a", k + idx), ("b", k + idx), ("g", k + idx)]
    return ([("a", k + ns + idx)] if kind == "i"
            else [("b", k + ns + 1 + idx), ("g", k + ns + idx)])


def _on_factors(sym: Sym, label: Label, op: Callable[[jax.Array, int], jax.Array]) -> dict:
    new = {"a": sym.a, "b": sym.b, "g": sym.g}
    if not sym.probe:
        for name, dim in _factor_axis(sym, label):
            if new[name] is not None:
                new[name] = op(new[name], dim)
    return new


def transpose(sym: Sym, permutation) -> Sym:
    return sym.replace(base=sy.on_base(sym.base, lax.transpose_p, permutation=permutation),
                       labels=tuple(sym.labels[p] for p in permutation))


def convert(sym: Sym, new_dtype, **params) -> Sym | None:
    if not jnp.issubdtype(new_dtype, jnp.inexact):
        return None
    return sym.replace(base=sy.on_base(sym.base, lax.convert_element_type_p, new_dtype=new_dtype,
                                     **params))


def squeeze(sym: Sym, dimensions, record) -> Sym:
    out = sym
    for d in sorted(dimensions, reverse=True):
        label = out.labels[d]
        if out.probe:
            record(out.path, ("index", label[1]))
        factors = _on_factors(out, label, lambda f, dim: lax.squeeze(f, (dim,)))
        labels = out.labels[:d] + out.labels[d + 1:]
        labels = labels if out.probe else sy.drop_label(labels, label)
        out = out.replace(base=sy.on_base(out.base, lax.squeeze_p, dimensions=(d,)), labels=labels,
                          **factors)
    return out


def slice_(sym: Sym, start_indices, limit_indices, strides) -> Sym:
    out = sym.replace(base=sy.on_base(sym.base, lax.slice_p, start_indices=start_indices,
                                    limit_indices=limit_indices, strides=strides))
    for ax, (lo, hi) in enumerate(zip(start_indices, limit_indices)):
        st = 1 if strides is None else strides[ax]
        if (lo, hi, st) != (0, sym.base.shape[ax], 1):
            out = out.replace(**_on_factors(
                out, sym.labels[ax], lambda f, d: lax.slice_in_dim(f, lo, hi, st, axis=d)))
    return out


def dynamic_slice(sym: Sym, starts, slice_sizes) -> Sym:
    out = sym.replace(base=sy.on_base(sym.base, lax.dynamic_slice_p, *starts,
                                    slice_sizes=tuple(slice_sizes)))
    for ax, (start, size) in enumerate(zip(starts, slice_sizes)):
        if size != sym.base.shape[ax]:
            out = out.replace(**_on_factors(
                out, sym.labels[ax],
                lambda f, d: lax.dynamic_slice_in_dim(f, start, size, axis=d)))
    return out


def expand(sym: Sym, shape, broadcast_dimensions, **params) -> Sym | None:
    """``broadcast_in_dim`` that only inserts size-1 axes: new stacked axes."""
    if math.prod(shape) != sym.base.size or list(broadcast_dimensions) != sorted(
            broadcast_dimensions) or sym.probe:
        return None
    base = sy.on_base(sym.base, lax.broadcast_in_dim_p, shape=shape,
                    broadcast_dimensions=broadcast_dimensions, **params)
    labels, a, b, g, ns = [], sym.a, sym.b, sym.g, sym.count("s")
    old = iter(sym.labels)
    for ax in range(len(shape)):
        if ax in broadcast_dimensions:
            labels.append(next(old))
        else:
            labels.append(("s", ns))
            a, b = jnp.expand_dims(a, sym.lead + ns), jnp.expand_dims(b, sym.lead + ns)
            g = None if g is None else jnp.expand_dims(g, sym.lead + ns)
            ns += 1
    return sym.replace(base=base, a=a, b=b, g=g, labels=tuple(labels))


def reshape(sym: Sym, new_sizes, dimensions=None, **params) -> Sym | None:
    """Merges/splits of adjacent axes of one kind that are adjacent in the factors too."""
    groups = sy.reshape_groups(sym.base.shape, tuple(new_sizes))
    if dimensions is not None or groups is None or sym.probe:
        return None
    blocks: dict[str, list] = {"s": [], "i": [], "o": []}
    for gi, gj in groups:
        kind, first = sym.labels[gi[0]]
        if any(sym.labels[g] != (kind, first + n) for n, g in enumerate(gi)):
            return None
        blocks[kind].append((first, gj))
    labels: list = [None] * len(new_sizes)
    sizes: dict[str, list] = {}
    for kind, found in blocks.items():
        sizes[kind] = []
        for _, gj in sorted(found):
            for g in gj:
                labels[g] = (kind, len(sizes[kind]))
                sizes[kind].append(new_sizes[g])
    r = sym.a.shape[-1]
    n = sym.a.shape[:sym.lead]
    a = sym.a.reshape(*n, *sizes["s"], *sizes["i"], r)
    b = sym.b.reshape(*n, *sizes["s"], r, *sizes["o"])
    g = None if sym.g is None else sym.g.reshape(*n, *sizes["s"], *sizes["o"])
    base = sy.on_base(sym.base, lax.reshape_p, new_sizes=tuple(new_sizes), dimensions=None,
                    **params)
    return sym.replace(base=base, a=a, b=b, g=g, labels=tuple(labels))


@register(lax.split_p)
def _split(eqn, invals, ctx):
    """A fused kernel split along any axis (``jnp.split(qkv, 3, axis=1)``): each piece a
    slice of the weight, its factors sliced along the same axis."""
    x = invals[0]
    if not isinstance(x, Sym):
        return materialize_rule(eqn, invals, ctx)
    axis, lo, outs = eqn.params["axis"], 0, []
    for size in eqn.params["sizes"]:
        start, limit = [0] * x.base.ndim, list(x.base.shape)
        start[axis], limit[axis] = lo, lo + int(size)
        outs.append(slice_(x, tuple(start), tuple(limit), None))
        lo += int(size)
    return outs


def _scaled(sym: Sym, c, eqn) -> Sym:
    """``W * c`` or ``W / c`` for a scalar ``c``: the base and ``b`` scaled (DoRA's ``g``
    multiplies the whole weight, so it stays)."""
    prim, params = eqn.primitive, bind_params(eqn)[1]
    base = sy.on_base(sym.base, prim, c, **params)
    if sym.probe:
        return sym.replace(base=base)
    return sym.replace(base=base, b=prim.bind(sym.b, jnp.asarray(c, sym.b.dtype), **params))


def _scale_rule(eqn, invals, ctx):
    """A kernel scaled by a scalar before use (``x @ (w * scale)``) stays factored; any
    other operand (a per-feature scale, another weight) materializes."""
    lhs, rhs = invals
    scalar = lambda v: not has_sym([v]) and jnp.ndim(v) == 0
    if isinstance(lhs, Sym) and scalar(rhs):
        return _scaled(lhs, rhs, eqn)
    if eqn.primitive is lax.mul_p and isinstance(rhs, Sym) and scalar(lhs):
        return _scaled(rhs, lhs, eqn)
    return materialize_rule(eqn, invals, ctx)


register(lax.mul_p, lax.div_p)(_scale_rule)

_ON_SYM = {
    lax.transpose_p: lambda s, rest, p, ctx: transpose(s, p["permutation"]),
    lax.convert_element_type_p: lambda s, rest, p, ctx: convert(s, **p),
    lax.squeeze_p: lambda s, rest, p, ctx: squeeze(s, p["dimensions"], ctx.record),
    lax.slice_p: lambda s, rest, p, ctx: slice_(s, p["start_indices"], p["limit_indices"],
                                                p["strides"]),
    lax.dynamic_slice_p: lambda s, rest, p, ctx: dynamic_slice(s, rest, p["slice_sizes"]),
    lax.broadcast_in_dim_p: lambda s, rest, p, ctx: None if rest else expand(s, **p),
    lax.reshape_p: lambda s, rest, p, ctx: None if rest else reshape(s, **p),
    lax.copy_p: lambda s, rest, p, ctx: s,
}
for _prim in _ON_SYM.keys() | quantized.DEFER:
    register(_prim)(_layout_rule(_ON_SYM.get(_prim)))
