"""The ``dot_general`` rule: an adapted weight computed factored, ``x W0 + s (x A) B``.

The low-rank path is two thin contractions, each one ``dot_general`` (plus a
transpose where the output order needs it), emitted directly rather than
through ``jnp.einsum``, whose path search and nested ``jit`` cost tracing
time at every use site; both are :func:`jlora._src.interpret.thin.thin`, whose
transpose computes each factor's gradient in the order XLA runs fastest.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import JaxprEqn

from jlora._src.config import LoraError
from jlora._src.interpret import capture, grouped, quantized, ranked, token_gate
from jlora._src.interpret import sym as sy
from jlora._src.interpret.core import Ctx, register
from jlora._src.interpret.example_axis import Axis, Lost, Where
from jlora._src.interpret.sym import Probe, Sym
from jlora._src.interpret.thin import thin
from jlora._src.interpret.uses import GATHERED, GROUPED, ONEHOT, RANKED, Use
from jlora._src.numerics import qview as qv

#: The two low-rank products (``benchmarks/profile_step.py`` swaps them for JAX's rule).
_thin_product = thin


@register(lax.dot_general_p)
def dot_general(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """Factored when a side is adapted (the other side materialized if it is too); a
    quantized side alone is dequantized for this dot only."""
    lhs, rhs = _one_symbolic(invals, ctx)
    if ctx.capture is not None and isinstance(lhs, Sym) != isinstance(rhs, Sym):
        return _captured(eqn, lhs, rhs, ctx)
    if isinstance(rhs, Sym):
        return factored(lhs, rhs, True, eqn.params, ctx.key, ctx.record, _rows(ctx, eqn, 0))
    if isinstance(lhs, Sym):
        return factored(rhs, lhs, False, eqn.params, ctx.key, ctx.record, _rows(ctx, eqn, 1))
    view_is_rhs = qv.is_view(rhs)
    return quantized.dot(
        rhs if view_is_rhs else lhs, lhs if view_is_rhs else rhs, view_is_rhs, eqn.params
    )


def _one_symbolic(invals: list, ctx: Ctx) -> tuple[Any, Any]:
    """Both sides symbolic: the non-adapted (quantized) one or else the right one built."""
    lhs, rhs = invals
    if isinstance(lhs, (Sym, qv.QView)) and isinstance(rhs, (Sym, qv.QView)):
        if isinstance(rhs, Sym) and not isinstance(lhs, Sym):
            lhs = sy.materialize(lhs)
        else:
            rhs = sy.materialize(rhs, ctx.record, "dot of two adapted weights")
    return lhs, rhs


def _base_dot(w: Any, x: jax.Array, w_is_rhs: bool, params: dict) -> jax.Array:
    """``dot_general`` of ``x`` with the weight's base (a quantized view dequantized)."""
    if qv.is_view(w):
        return quantized.dot(w, x, w_is_rhs, params)
    return lax.dot_general_p.bind(*((x, w) if w_is_rhs else (w, x)), **params)


@register(lax.dot_general_p, on=Probe)
def _probe_dot(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """A probed weight contracted: record its contracted, batch and free axes."""
    lhs, rhs = _one_symbolic(invals, ctx)
    if not isinstance(rhs, Probe) and not isinstance(lhs, Probe):
        return dot_general(eqn, [lhs, rhs], ctx)  # the probe was the side built
    w_is_rhs = isinstance(rhs, Probe)
    (w, x), params = ((rhs, lhs) if w_is_rhs else (lhs, rhs)), eqn.params
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    wc, wb = (rc, rb) if w_is_rhs else (lc, lb)
    free = [a for a in range(len(w.labels)) if a not in wc and a not in wb]
    ctx.record(w.path, ("dot", *(tuple(w.labels[a][1] for a in axes) for axes in (wc, wb, free))))
    return _base_dot(w.base, x, w_is_rhs, params)


def _captured(eqn: JaxprEqn, lhs: Any, rhs: Any, ctx: Ctx) -> jax.Array:
    """Capture mode: the base product, and the adapted weight's input rows recorded."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if isinstance(rhs, Sym):
        capture.add(ctx.capture, rhs, lhs, lc, rc, lb, rb)
    else:
        capture.add(ctx.capture, lhs, rhs, rc, lc, rb, lb)

    def base(v: Any) -> Any:
        return sy.value(v.base) if isinstance(v, Sym) else v

    return lax.dot_general_p.bind(base(lhs), base(rhs), **eqn.params)


def _fit_error(sym: Sym, contracted: Sequence[int], batch: Sequence[int]) -> LoraError:
    kinds = {"s": "stacked", "i": "in", "o": "out"}

    def desc(axes: Sequence[int]) -> list[str]:
        return [f"axis {ax} ({kinds[sym.labels[ax][0]]})" for ax in axes]

    return LoraError(
        f"the adapter for {sym.path!r} does not fit how the model uses the weight: the model "
        f"contracts {desc(contracted)} and batches {desc(batch)} of the kernel as the model sees "
        "it, but a LoRA factor must contract exactly all 'in' (or all 'out') axes; learn the "
        "axes by tracing: "
        + (
            "jlora.peft.load(path, params, fn, *example_args)"
            if sym.axes_from == "assumed"
            else "jlora.init(key, params, cfg, fn, *example_args)"
        )
    )


def _mode(sym: Sym, wc: Sequence[int], wb: Sequence[int]) -> str:
    """``'i'`` when the model contracts all in-axes, ``'o'`` for all out-axes (x @ W.T).

    Factors read from a file under an assumed layout (``axes_from="assumed"``) must not be
    used with swapped roles: that use shows the layout was torch's, so the file's update
    would be applied transposed."""
    kinds = {sym.labels[a][0] for a in wc}
    mode = kinds.pop() if len(kinds) == 1 else None
    if (
        mode not in ("i", "o")
        or len(wc) != sym.count(mode)
        or any(sym.labels[a][0] != "s" for a in wb)
    ):
        raise _fit_error(sym, wc, wb)
    sy.check_assumed(sym, wc)
    return mode


@dataclasses.dataclass(frozen=True)
class Rows:
    """What a dot's input rows are, where it matters: in a mixed-adapter batch, ``where``
    the example axis lies (an ``example_axis`` value) and ``mixed`` the path that serves it
    (:mod:`jlora._src.interpret.grouped`); under ``lora_mask``, ``gate`` is ``(mask, the
    input's token placements)`` (:mod:`jlora._src.interpret.token_gate`)."""

    where: Where = None
    mixed: str = "auto"
    gate: tuple | None = None


def _rows(ctx: Ctx, eqn: JaxprEqn, side: int) -> Rows | None:
    """How operand ``side`` of this dot relates to the batch (None: a plain call)."""
    if ctx.examples is None and ctx.mask is None:
        return None
    where = None if ctx.examples is None else ctx.examples.operand(eqn, side)
    gate = None
    if ctx.mask is not None:
        tokens = frozenset() if ctx.tokens is None else ctx.tokens.operand(eqn, side, frozenset())
        gate = (ctx.mask, tokens)
    return Rows(where, ctx.mixed, gate)


def factored(
    x: jax.Array,
    sym: Sym,
    sym_is_rhs: bool,
    params: dict,
    key: jax.Array | None,
    record: Callable[[str, Any], None],
    rows: Rows | None = None,
) -> jax.Array:
    """``dot_general`` of an array with a symbolic weight, computed factored.

    LoRA: ``x W0 + s (drop(x) A) B``. DoRA (PEFT's formula): ``g (x W0 + s (x A) B)``,
    and with dropout ``x W0 + (g - 1) (drop(x) W0) + g s (drop(x) A) B``. ``rows``: a
    mixed batch's example axis and path, ``lora_mask``'s gate (:class:`Rows`).
    """
    rows = Rows() if rows is None else rows
    gate = rows.gate
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    xc, wc, xb, wb = (lc, rc, lb, rb) if sym_is_rhs else (rc, lc, rb, lb)

    def bind(w: Any, v: jax.Array) -> jax.Array:
        return _base_dot(w, v, sym_is_rhs, params)

    base_out = bind(sym.base, x)
    mode = _mode(sym, wc, wb)
    if sym.g is not None and mode == "o":
        return bind(sy.materialize(sym, record, "DoRA weight contracted on its output axes"), x)
    x_d = _dropout(x, sym.dropout, key)
    if gate is not None:
        if sym.g is not None:
            raise LoraError(
                f"lora_mask cannot gate {sym.path!r}: a DoRA adapter rescales the "
                "whole output, not a low-rank term (PEFT's aLoRA has no DoRA)"
            )
        free = [i for i in range(x.ndim) if i not in xc and i not in xb]
        x_d = token_gate.gate(x_d, gate[1], gate[0], free, sym.path)
    y, g, how = _low_rank(
        x_d, sym, mode, sym_is_rhs, (xc, wc, xb, wb), params.get("precision"), rows
    )
    kind = "factored" if mode == "i" else "transposed"
    record(sym.path, Use(kind, how, gated=gate is not None, learned=sym.axes_from != "flax"))
    if g is None:
        return base_out + y.astype(base_out.dtype)
    if x_d is x:
        return (g * (base_out + y)).astype(base_out.dtype)
    return (base_out + (g - 1) * bind(sym.base, x_d) + g * y).astype(base_out.dtype)


def _specs(
    x: jax.Array, sym: Sym, mode: str, sym_is_rhs: bool, dims: tuple, ex_axis: int
) -> dict[str, str]:
    """Einsum letters of x, the two factors in the order used, the rank-r intermediate
    ``t``, the dot's output, DoRA's ``g`` and (mixed batches) the example axis."""
    xc, wc, xb, wb = dims
    letter = dict(
        zip(range(x.ndim), string.ascii_letters, strict=False)
    )  # (the first ndim letters)
    wl = {
        sym.labels[wa]: letter[xa]
        for xa, wa in zip(list(xc) + list(xb), list(wc) + list(wb), strict=True)
    }
    free_w = [ax for ax in range(sym.base.ndim) if ax not in wc and ax not in wb]
    for n, ax in enumerate(free_w):
        wl[sym.labels[ax]] = string.ascii_letters[x.ndim + n]
    r = string.ascii_letters[x.ndim + len(free_w)]
    sa, sb = sy.factor_specs(sym, wl, r)
    x_free = "".join(letter[i] for i in range(x.ndim) if i not in xc and i not in xb)
    batch = "".join(letter[i] for i in xb)
    free_stack = "".join(wl[sym.labels[ax]] for ax in free_w if sym.labels[ax][0] == "s")
    w_free = "".join(wl[sym.labels[ax]] for ax in free_w)
    ex = letter[ex_axis] if sym.ids is not None else ""
    return dict(
        x="".join(letter[i] for i in range(x.ndim)),
        first=ex + (sa if mode == "i" else sb),
        second=ex + (sb if mode == "i" else sa),
        t=batch + x_free + free_stack + r,
        g=ex + sy.g_spec(sym, wl),
        ex=ex,
        out=batch + (x_free + w_free if sym_is_rhs else w_free + x_free),
    )


def _low_rank(
    x: jax.Array, sym: Sym, mode: str, sym_is_rhs: bool, dims: tuple, prec: Any, rows: Rows
) -> tuple[jax.Array, jax.Array | None, str]:
    """``s * (x A) B`` laid out like the dot's output, DoRA's ``g`` broadcast to it, and
    which mixed-batch path served it (``""`` outside mixed batches).

    In a mixed batch each example (along x's example axis) gathers its own adapter's
    factors; examples with id -1 get no low-rank term (and ``g = 1``).
    """
    ex_axis, ids = (
        _example_ids(sym, x, dims[0], dims[2], rows.where) if sym.ids is not None else (0, None)
    )
    applies = grouped.applies(sym, mode, dims)
    path = grouped.chosen(rows.mixed, x, sym, ex_axis) if applies else ""
    sp = _specs(x, sym, mode, sym_is_rhs, dims, ex_axis)
    if path in ("grouped", "onehot"):
        y = grouped.low_rank(x, sym, sym_is_rhs, dims, (ex_axis, ids), prec, path == "onehot")
        return _out_of_range(y, ids, sym, sp), None, GROUPED if path == "grouped" else ONEHOT
    if sym.ranked is not None and path in ("", "gather"):  # concrete ids: each class at its rank
        picked = ranked.low_rank(x, sym, mode, sp, ex_axis, prec)
        if picked is not None:
            return picked, None, RANKED
    first, second = (sym.a, sym.b) if mode == "i" else (sym.b, sym.a)
    g = sym.g
    if sym.ids is not None:  # gather each example's factors (and g)
        assert ids is not None

        def pick(f: jax.Array) -> jax.Array:
            return jnp.take(f, jnp.maximum(ids, 0), axis=0, mode="clip")

        first, second, g = pick(first), pick(second), None if g is None else pick(g)
    t = _thin_product(f"{sp['x']},{sp['first']}->{sp['t']}", prec, x.astype(first.dtype), first)
    if sym.scale != 1.0:  # scale the thin rank-r intermediate, not the full-size output
        t = t * jnp.asarray(sym.scale, t.dtype)
    y = _thin_product(f"{sp['t']},{sp['second']}->{sp['out']}", prec, t, second)
    g = None if g is None else sy.broadcast(g, sp["g"], sp["out"])
    if sym.ids is not None:
        assert ids is not None
        used = sy.broadcast(ids >= 0, sp["ex"], sp["out"])
        y = _out_of_range(jnp.where(used, y, jnp.zeros((), y.dtype)), ids, sym, sp)
        g = None if g is None else jnp.where(used, g, jnp.ones((), g.dtype))
    return y, g, "" if sym.ids is None else GATHERED


def _out_of_range(y: jax.Array, ids: jax.Array | None, sym: Sym, sp: dict) -> jax.Array:
    """NaN in the rows whose adapter id is outside ``-1 .. n-1``: traced ids cannot be
    checked on the host (``check_ids`` checks concrete ones), and no row may silently get
    another adapter's output (``take``'s clipping) or the base's."""
    if ids is None:  # (not a mixed batch: no ids to check)
        return y
    bad = (ids < -1) | (ids >= sym.a.shape[0])
    return jnp.where(sy.broadcast(bad, sp["ex"], sp["out"]), jnp.array(jnp.nan, y.dtype), y)


def _example_ids(
    sym: Sym, x: jax.Array, xc: Sequence[int], xb: Sequence[int], where: Axis | Lost | None
) -> tuple[int, jax.Array]:
    """``(axis, ids)``: x's example axis and the adapter id of each of its rows."""
    n = sym.ids.shape[0]
    if (
        isinstance(where, Axis)
        and where.axis not in xc
        and where.axis not in xb
        and x.shape[where.axis] == n * where.inner
    ):
        ids = sym.ids if where.inner == 1 else jnp.repeat(sym.ids, where.inner)
        return where.axis, ids
    if where is None:
        why = "it does not depend on the examples at all"
    elif isinstance(where, Lost):
        why = f"the example axis was lost on the way (at {where.why})"
    elif where.axis in xc or where.axis in xb:
        how = "contracted" if where.axis in xc else "batched"
        why = f"its example axis {where.axis} is {how}"
    else:
        size = x.shape[where.axis]
        why = f"its example axis {where.axis} is of size {size}, not {n} x {where.inner}"
    raise LoraError(
        f"a mixed-adapter batch ({n} adapter_ids) needs to know which rows of each input "
        f"that meets an adapted weight belong to which example; {sym.path!r} meets an input "
        f"of shape {tuple(x.shape)} where {why}; if the arguments' example axis is not "
        "their first, say where it is with example_axes= (as jax.vmap's in_axes), or serve "
        "these adapters one at a time"
    )


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))
