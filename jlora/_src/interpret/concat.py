"""The ``concatenate`` rule: adapted kernels fused into one (``[W_q | W_k | W_v]``).

Along an out axis, ``[W1 | W2] = [W01 | W02] + [A1 A2] diag(s1 B1, s2 B2)``: the
ranks add, ``A``s are concatenated along the rank and the scaled ``B``s form a
block-diagonal. Along an in axis the roles swap. A plain (unadapted) piece adds
zero rows or columns. The result is one symbolic weight, so the fused dot stays
factored. Pieces with different layouts, DoRA pieces, stacked-axis
concatenation and mixed-adapter batches materialize.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import JaxprEqn

from jlora._src.interpret import sym as sy
from jlora._src.interpret.core import Ctx, materialize_rule, register
from jlora._src.interpret.sym import Probe, Sym
from jlora._src.numerics import qview as qv

#: Joins the paths of concatenated kernels: ``explain`` reports a fused use under each.
FUSED = " + "


def _pad(f: jax.Array, axis: int, before: int, after: int) -> jax.Array:
    widths = [(0, 0)] * f.ndim
    widths[axis] = (before, after)
    return jnp.pad(f, widths)


def by_path(records: dict, paths: Iterable[str]) -> dict[str, list]:
    """The records of each path, a fused kernel's (keys joined by :data:`FUSED`) counted
    for each of its pieces."""
    uses: dict[str, list] = {p: [] for p in paths}
    for key, found in records.items():
        for p in key.split(FUSED):
            if p in uses:
                uses[p].extend(found)
    return uses


def _fused(pieces: list, dim: int) -> Sym | None:
    syms = [p for p in pieces if isinstance(p, Sym)]
    first = syms[0]
    if any(s.labels != first.labels or type(s) is not type(first) for s in syms) or any(
        qv.is_view(p) for p in pieces
    ):
        return None
    paths = FUSED.join(dict.fromkeys(s.path for s in syms))
    if any(s.g is not None or s.ids is not None for s in syms):
        return None
    kind, j = first.labels[dim]
    if kind == "s":
        return None
    a, b = _blocks(pieces, dim, kind, j)
    bases = [sy.value(p.base) if isinstance(p, Sym) else p for p in pieces]
    base = lax.concatenate([x.astype(bases[0].dtype) for x in bases], dim)
    return first.replace(base=base, a=a, b=b, scale=1.0, path=paths)


def _blocks(pieces: list, dim: int, kind: str, j: int) -> tuple[jax.Array, jax.Array]:
    """The fused factors: along an out axis the ``A``s side by side and the scaled ``B``s
    block-diagonal, along an in axis the other way round (zeros for plain pieces)."""
    syms = [p for p in pieces if isinstance(p, Sym)]
    first, ns = syms[0], syms[0].count("s")
    r_ax = ns  # the rank axis: last of a, first after the stack axes of b
    dtype = jnp.result_type(*[s.a.dtype for s in syms])
    ranks = [s.a.shape[-1] if isinstance(s, Sym) else 0 for s in pieces]
    total, at, a_parts, b_parts = sum(ranks), 0, [], []
    for p, r in zip(pieces, ranks, strict=True):
        size = (p.base if isinstance(p, Sym) else p).shape[dim]

        def pad(f: jax.Array, ax: int, at: int = at, r: int = r) -> jax.Array:
            return _pad(f.astype(dtype), ax, at, total - at - r)

        if kind == "o":  # A's concatenated along the rank, B block-diagonal
            if r:
                a_parts.append(p.a.astype(dtype))
            b_parts.append(
                pad(p.b * p.scale, r_ax)
                if r
                else jnp.zeros((*first.b.shape[:r_ax], total, *_out(first, j, size)), dtype)
            )
        else:  # A block-diagonal, B's concatenated along the rank
            a_parts.append(
                pad(p.a, p.a.ndim - 1)
                if r
                else jnp.zeros(first.a.shape[:ns] + _ins(first, j, size) + (total,), dtype)
            )
            if r:
                b_parts.append((p.b * p.scale).astype(dtype))
        at += r
    if kind == "o":
        a = jnp.concatenate(a_parts, axis=first.a.ndim - 1)
        b = jnp.concatenate(b_parts, axis=ns + 1 + j)
    else:
        a = jnp.concatenate(a_parts, axis=ns + j)
        b = jnp.concatenate(b_parts, axis=r_ax)
    return a, b


def _out(sym: Sym, j: int, size: int) -> tuple:
    outs = list(sym.b.shape[sym.count("s") + 1 :])
    outs[j] = size
    return tuple(outs)


def _ins(sym: Sym, j: int, size: int) -> tuple:
    ins = list(sym.a.shape[sym.count("s") : -1])
    ins[j] = size
    return tuple(ins)


@register(lax.concatenate_p, on=Probe)
def _probe_concatenate(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """Probed weights fused (``jnp.concatenate([wq, wk, wv], 1)``): one probe of all their
    paths, used as the fused weight is, so each learns its axes from that use."""
    syms = [p for p in invals if isinstance(p, Sym)]
    first = syms[0]
    if any(not isinstance(s, Probe) or s.labels != first.labels for s in syms) or any(
        qv.is_view(p) for p in invals
    ):
        return concatenate(eqn, invals, ctx)
    paths = FUSED.join(dict.fromkeys(s.path for s in syms))
    bases = [p.base if isinstance(p, Sym) else p for p in invals]
    return first.replace(base=lax.concatenate(bases, eqn.params["dimension"]), path=paths)


@register(lax.concatenate_p)
def concatenate(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    out = _fused(invals, eqn.params["dimension"])
    return materialize_rule(eqn, invals, ctx) if out is None else out
