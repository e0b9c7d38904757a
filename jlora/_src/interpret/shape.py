"""Rules for layout ops that commute with the factorisation: the weight stays symbolic.

``transpose``, ``convert_element_type``, ``squeeze``, ``slice``, ``dynamic_slice``,
size-1 ``broadcast_in_dim``, ``reshape`` (merges and splits of adjacent axes of one
kind), ``rev`` and ``copy`` update base, factors and labels together, so indexing one layer
of a stacked kernel stays factored. On a quantized view they narrow or defer
(:mod:`jlora._src.interpret.quantized`). Anything they cannot express materializes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import JaxprEqn
from jax.typing import DTypeLike

from jlora._src.interpret import quantized
from jlora._src.interpret import sym as sy
from jlora._src.interpret.core import Ctx, Rule, bind_params, has_sym, materialize_rule, register
from jlora._src.interpret.sym import Label, Probe, Sym
from jlora._src.interpret.walk import aval_shape
from jlora._src.numerics import qview as qv


def _layout_rule(on_sym: Callable | None) -> Rule:
    """The rule of one layout primitive: ``on_sym(sym, operands, params, ctx)`` for an
    adapted weight (None: not expressible), deferral for a quantized one."""

    def rule(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
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


def _on_factors(sym: Sym, label: Label, op: Callable[[jax.Array, int], jax.Array]) -> dict:
    new = {"a": sym.a, "b": sym.b, "g": sym.g}
    for name, dim in sy.factor_dims(sym, label).items():  # (a probe has none)
        if new[name] is not None:
            new[name] = op(new[name], dim)
    return new


def transpose(sym: Sym, permutation: Sequence[int]) -> Sym:
    return sym.replace(
        base=sy.on_base(sym.base, lax.transpose_p, permutation=permutation),
        labels=tuple(sym.labels[p] for p in permutation),
    )


def convert(sym: Sym, new_dtype: DTypeLike, **params: Any) -> Sym | None:
    if not jnp.issubdtype(new_dtype, jnp.inexact):
        return None
    return sym.replace(
        base=sy.on_base(sym.base, lax.convert_element_type_p, new_dtype=new_dtype, **params)
    )


def squeeze(sym: Sym, dimensions: Sequence[int], record: Callable[[str, Any], None]) -> Sym:
    out = sym
    for d in sorted(dimensions, reverse=True):
        label = out.labels[d]
        factors = _on_factors(out, label, lambda f, dim: lax.squeeze(f, (dim,)))
        labels = sy.drop_label(out.labels[:d] + out.labels[d + 1 :], label)
        out = out.replace(
            base=sy.on_base(out.base, lax.squeeze_p, dimensions=(d,)), labels=labels, **factors
        )
    return out


def slice_(
    sym: Sym,
    start_indices: Sequence[int],
    limit_indices: Sequence[int],
    strides: Sequence[int] | None,
) -> Sym:
    out = sym.replace(
        base=sy.on_base(
            sym.base,
            lax.slice_p,
            start_indices=start_indices,
            limit_indices=limit_indices,
            strides=strides,
        )
    )
    for ax, (lo, hi) in enumerate(zip(start_indices, limit_indices, strict=True)):
        st = 1 if strides is None else strides[ax]
        if (lo, hi, st) != (0, sym.base.shape[ax], 1):
            out = out.replace(
                **_on_factors(
                    out,
                    sym.labels[ax],
                    _slicer(lo, hi, st),
                )
            )
    return out


def _slicer(lo: int, hi: int, st: int) -> Callable[[jax.Array, int], jax.Array]:
    """``op(f, d)``: ``f[lo:hi:st]`` along axis ``d``."""
    return lambda f, d: lax.slice_in_dim(f, lo, hi, st, axis=d)


def _dynamic_slicer(start: Any, size: int) -> Callable[[jax.Array, int], jax.Array]:
    """``op(f, d)``: ``size`` entries of ``f`` from ``start`` (may be traced) along ``d``."""
    return lambda f, d: lax.dynamic_slice_in_dim(f, start, size, axis=d)


def dynamic_slice(sym: Sym, starts: Sequence, slice_sizes: Sequence[int]) -> Sym:
    out = sym.replace(
        base=sy.on_base(sym.base, lax.dynamic_slice_p, *starts, slice_sizes=tuple(slice_sizes))
    )
    for ax, (start, size) in enumerate(zip(starts, slice_sizes, strict=True)):
        if size != sym.base.shape[ax]:
            out = out.replace(
                **_on_factors(
                    out,
                    sym.labels[ax],
                    _dynamic_slicer(start, size),
                )
            )
    return out


def expand(
    sym: Sym, shape: Sequence[int], broadcast_dimensions: Sequence[int], **params: Any
) -> Sym | None:
    """``broadcast_in_dim`` that only inserts size-1 axes: new stacked axes."""
    if math.prod(shape) != sym.base.size or list(broadcast_dimensions) != sorted(
        broadcast_dimensions
    ):
        return None
    base = sy.on_base(
        sym.base,
        lax.broadcast_in_dim_p,
        shape=shape,
        broadcast_dimensions=broadcast_dimensions,
        **params,
    )
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


def rev(sym: Sym, dimensions: Sequence[int]) -> Sym:
    """Axes reversed (``jnp.flip``; ``conv_transpose`` flips its kernel): the factors'
    matching axes reversed too."""
    out = sym.replace(base=sy.on_base(sym.base, lax.rev_p, dimensions=tuple(dimensions)))
    for d in dimensions:
        out = out.replace(**_on_factors(out, sym.labels[d], lambda f, dim: lax.rev(f, (dim,))))
    return out


#: What ``explain`` says of a weight broadcast along new axes (a position table over the
#: batch before an add): the use reads every value, so building it is the use's own cost.
BROADCAST = (
    "broadcast_in_dim: every value is read, so it is built once, at its own "
    "size, before the broadcast"
)


def broadcast(sym: Sym, rest: list, params: dict, ctx: Ctx) -> Any:
    """Size-1 new axes stay symbolic (:func:`expand`); new axes of any size: the weight
    (already narrowed by any slice before) built, then broadcast."""
    if rest:
        return None
    out = expand(sym, **params)
    if out is not None:
        return out
    return lax.broadcast_in_dim_p.bind(sy.materialize(sym, ctx.record, BROADCAST), **params)


def reshape(
    sym: Sym, new_sizes: Sequence[int], dimensions: Sequence[int] | None = None, **params: Any
) -> Sym | None:
    """Merges/splits of adjacent axes of one kind that are adjacent in the factors too."""
    groups = sy.reshape_groups(sym.base.shape, tuple(new_sizes))
    if dimensions is not None or groups is None:
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
    n = sym.a.shape[: sym.lead]
    a = sym.a.reshape(*n, *sizes["s"], *sizes["i"], r)
    b = sym.b.reshape(*n, *sizes["s"], r, *sizes["o"])
    g = None if sym.g is None else sym.g.reshape(*n, *sizes["s"], *sizes["o"])
    base = sy.on_base(
        sym.base, lax.reshape_p, new_sizes=tuple(new_sizes), dimensions=None, **params
    )
    return sym.replace(base=base, a=a, b=b, g=g, labels=tuple(labels))


@register(lax.split_p)
def _split(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
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


def _scale_side(sym: Sym, c: Any) -> str | None:
    """Which factor a scale ``c`` (0-d, or the weight's rank with size-1 axes) folds
    into: ``'b'`` when it varies along out (and stacked) axes only, ``'a'`` when along in
    (and stacked) axes only; None when it varies along both (not low-rank)."""
    if jnp.ndim(c) == 0:
        return "b"
    if jnp.ndim(c) != sym.base.ndim:
        return None
    kinds = {sym.labels[ax][0] for ax, n in enumerate(jnp.shape(c)) if n != 1}
    return "b" if kinds <= {"s", "o"} else "a" if kinds <= {"s", "i"} else None


def _as_factor(sym: Sym, c: Any, side: str) -> Any:
    """The scale laid out to broadcast against factor ``side`` (size 1 at the rank axis)."""
    if jnp.ndim(c) == 0:
        return c
    keep = [ax for ax, (k, _) in enumerate(sym.labels) if k in ("s", "i" if side == "a" else "o")]
    c = jnp.reshape(c, [jnp.shape(c)[ax] for ax in keep])
    letter = sy.letters(sym)
    r = "_"  # the rank axis: a letter no label uses
    spec = sy.factor_specs(sym, letter, r)[side == "b"]
    c = sy.broadcast(c, "".join(letter[sym.labels[ax]] for ax in keep), spec)
    return c.reshape((1,) * sym.lead + c.shape)


def _scale_rule(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """A kernel scaled before use (``x @ (w * scale)``, ``w / scale``) stays factored when
    the scale is a scalar or varies along in axes only (folded into ``A``) or out axes
    only (folded into ``B``); DoRA's ``g`` is per out feature and commutes with it.
    Any other operand (a scale along in and out axes, another weight) materializes."""
    scaled = _scaled(eqn, invals, Sym)
    if scaled is None:
        return materialize_rule(eqn, invals, ctx)
    (sym, c), params = scaled, bind_params(eqn)[1]
    base = sy.on_base(sym.base, eqn.primitive, c, **params)
    side = _scale_side(sym, c)
    if side is None:
        return materialize_rule(eqn, invals, ctx)
    f = getattr(sym, side)
    f = eqn.primitive.bind(f, _as_factor(sym, c, side).astype(f.dtype), **params)
    return sym.replace(base=base, **{side: f})


register(lax.mul_p, lax.div_p)(_scale_rule)


@register(lax.mul_p, lax.div_p, on=Probe)
def _probe_scale(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """A probed weight scaled by a plain operand of its shape or less: its layout is kept."""
    scaled = _scaled(eqn, invals, Probe)
    if scaled is None:
        return materialize_rule(eqn, invals, ctx)
    sym, c = scaled
    return sym.replace(base=sy.on_base(sym.base, eqn.primitive, c, **bind_params(eqn)[1]))


def _scaled(eqn: JaxprEqn, invals: list, kind: type[Sym]) -> tuple[Sym, Any] | None:
    """``(weight, scale)`` of a mul/div whose weight is a ``kind`` value and whose other
    operand is plain and no larger (the result has the weight's shape), else None."""
    lhs, rhs = invals
    if eqn.primitive is lax.mul_p and isinstance(rhs, Sym):
        lhs, rhs = rhs, lhs
    if not isinstance(lhs, kind) or has_sym([rhs]) or aval_shape(eqn.outvars[0]) != lhs.base.shape:
        return None
    return lhs, rhs


@register(lax.squeeze_p, on=Probe)
def _probe_squeeze(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """Size-1 axes of a probed weight squeezed away: each recorded as indexed (stacked)."""
    sym = invals[0]
    if not isinstance(sym, Probe) or has_sym(invals[1:]):
        return materialize_rule(eqn, invals, ctx)
    dims = tuple(eqn.params["dimensions"])
    for d in dims:
        ctx.record(sym.path, ("index", sym.labels[d][1]))
    labels = tuple(lab for d, lab in enumerate(sym.labels) if d not in dims)
    return sym.replace(base=sy.on_base(sym.base, lax.squeeze_p, dimensions=dims), labels=labels)


#: A probed weight broadcast is built (the use reads every value): its base, recorded.
register(lax.broadcast_in_dim_p, on=Probe)(materialize_rule)


@register(lax.reshape_p, on=Probe)
def _probe_reshape(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """Each new axis labelled with the original axes it holds (a merge: all of its
    group's, a split: the one it came from; an inserted size-1 axis: none)."""
    sym, rest, params = invals[0], invals[1:], dict(eqn.params)
    new_sizes = params.pop("new_sizes")
    groups = sy.reshape_groups(sym.base.shape, tuple(new_sizes))
    if rest or not isinstance(sym, Probe) or params.pop("dimensions") is not None or not groups:
        return materialize_rule(eqn, invals, ctx)
    labels: list = [None] * len(new_sizes)
    for gi, gj in groups:
        held = tuple(sy.originals(sym.labels[g]) for g in gi)
        for g in gj:
            labels[g] = (
                "p",
                () if new_sizes[g] == 1 and len(gj) > 1 else tuple(ax for t in held for ax in t),
            )
    base = sy.on_base(
        sym.base, lax.reshape_p, new_sizes=tuple(new_sizes), dimensions=None, **params
    )
    return sym.replace(base=base, labels=tuple(labels))


_ON_SYM = {
    lax.transpose_p: lambda s, rest, p, ctx: transpose(s, p["permutation"]),
    lax.convert_element_type_p: lambda s, rest, p, ctx: convert(s, **p),
    lax.squeeze_p: lambda s, rest, p, ctx: squeeze(s, p["dimensions"], ctx.record),
    lax.slice_p: lambda s, rest, p, ctx: slice_(
        s, p["start_indices"], p["limit_indices"], p["strides"]
    ),
    lax.dynamic_slice_p: lambda s, rest, p, ctx: dynamic_slice(s, rest, p["slice_sizes"]),
    lax.broadcast_in_dim_p: broadcast,
    lax.reshape_p: lambda s, rest, p, ctx: None if rest else reshape(s, **p),
    lax.rev_p: lambda s, rest, p, ctx: rev(s, p["dimensions"]),
    lax.copy_p: lambda s, rest, p, ctx: s,
}
for _prim in _ON_SYM.keys() | quantized.DEFER:
    register(_prim)(_layout_rule(_ON_SYM.get(_prim)))
