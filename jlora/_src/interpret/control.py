"""Rules for higher-order primitives: the interpreter recurses into their sub-jaxprs.

``jit`` and ``closed_call`` are inlined: evaluated in place. A custom
derivative (``custom_jvp_call``, ``custom_vjp_call``, ``jax_custom_vjp3``'s hi
primitive) that receives an adapted or quantized weight gets it materialized,
built outside the call so the gradient reaches the factors through the user's
rule (inlining would differentiate the primal body and drop that rule); only
``init``'s probe and EVA's capture, which take no derivative, look inside. ``remat``, ``scan``,
``cond`` and ``while`` are re-emitted as the same control flow (remat policy,
scan length/unroll kept) with their bodies interpreted; a scan over a stacked
kernel slices the factors per layer, and a quantized stack is read one layer
per step. Carries and outputs leave a body materialized.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn

from jlora._src.interpret import capture
from jlora._src.interpret import sym as sy
from jlora._src.interpret.core import Ctx, Rule, bind, evaluate, materialized, register
from jlora._src.interpret.walk import CALLS, primitives
from jlora._src.numerics import qview as qv

_CALL_NAMES = {"pjit": "jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
#: Why a custom-derivative call's weights go in materialized, as ``explain`` says it.
KEEPS_VJP = "custom_vjp: keeps the user's backward"
KEEPS_JVP = "custom_jvp: keeps the user's derivative rule"
_CUSTOM = {
    "custom_jvp_call": KEEPS_JVP,
    "custom_vjp_call": KEEPS_VJP,
    "custom_vjp_call_jaxpr": KEEPS_VJP,
}


def _inline(field: str) -> Rule:
    def rule(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
        sub = eqn.params[field]  # a ClosedJaxpr, or an open Jaxpr (call_p)
        consts = getattr(sub, "consts", ())
        return evaluate(getattr(sub, "jaxpr", sub), consts, invals, ctx)

    return rule


def _inspecting(invals: list, ctx: Ctx) -> bool:
    """Whether this evaluation takes no derivative: ``init``'s probe or EVA's capture."""
    return ctx.capture is not None or any(isinstance(v, sy.Probe) for v in invals)


def _custom(field: str, why: str) -> Rule:
    """A custom-derivative call bound as it is, its symbolic inputs materialized (``why``)."""
    inline = _inline(field)

    def rule(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
        if _inspecting(invals, ctx):
            return inline(eqn, invals, ctx)
        return bind(eqn, materialized(invals, ctx, why))

    return rule


for _prim, _field in CALLS.items():
    why = _CUSTOM.get(_prim.name)
    register(_prim)(_inline(_field) if why is None else _custom(_field, why))
for _name, _field in _CALL_NAMES.items():
    why = _CUSTOM.get(_name)
    register(names=(_name,))(_inline(_field) if why is None else _custom(_field, why))


@register(names=("call_hi_primitive",))
def _hi_call(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """JAX's opt-in "hi" primitives (``jax_remat3``, ``jax_custom_vjp3``): a remat's primal
    computation (``expand``) traced to a jaxpr and interpreted under its policy; a custom_vjp
    bound with its inputs materialized, as ``custom_vjp_call`` is."""
    hi, closed = eqn.params["_prim"], ctx.expanded.of(eqn)
    policy = getattr(hi, "params", {}).get("policy", False)
    custom = "CustomVJP" in type(hi).__name__  # jax_custom_vjp3's CustomVJPTraced
    if custom and not _inspecting(invals, ctx):  # the user's rule kept
        return bind(eqn, materialized(invals, ctx, KEEPS_VJP))
    if policy is False:
        return evaluate(closed.jaxpr, closed.consts, invals, ctx)
    return _checkpointed(closed.jaxpr, closed.consts, invals, ctx, policy=policy)


@register(*primitives("remat_p"), names=("remat2", "checkpoint"))
def _remat(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    p = eqn.params
    return _checkpointed(
        p["jaxpr"], (), invals, ctx, prevent_cse=p["prevent_cse"], policy=p["policy"]
    )


def _checkpointed(
    jaxpr: Jaxpr, consts: Sequence, invals: list, ctx: Ctx, **remat_params: Any
) -> list:
    """The interpreted jaxpr inside ``jax.checkpoint`` (the dropout key goes in as an input;
    capture statistics come out after the outputs)."""
    keys: list = []

    def body(key: jax.Array | None, *vals: Any) -> list:
        inner = None if ctx.capture is None else ctx.capture.fresh()
        outs = evaluate(jaxpr, consts, vals, dataclasses.replace(ctx, key=key, capture=inner))
        return materialized(outs, ctx, "remat") + capture.flat(inner, keys)

    outs = list(jax.checkpoint(body, **remat_params)(ctx.key, *invals))
    n = len(outs) - capture.STATS * len(keys)
    capture.merge(ctx.capture, keys, outs[n:])
    return outs[:n]


def _scan_slice(v: Any, ctx: Ctx) -> tuple[Any, Callable[[Any, jax.Array], Any]]:
    """Split a scanned-over value into ``xs`` (arrays with the scan axis first) and
    ``rebuild(x, i)``, its value at step ``i``. A quantized base is not sliced by the
    scan: step ``i`` reads (and later dequantizes) just its own layer."""
    if qv.is_view(v):
        if not v.ops:
            return None, lambda x, i: v.index(i)
        v = v.value()
    if not isinstance(v, sy.Sym):
        return v, lambda x, i: x
    if qv.is_view(v.base) and v.base.ops:
        v = v.replace(base=v.base.value())
    lazy = qv.is_view(v.base)
    base_xs = None if lazy else v.base
    take = (lambda x, i: v.base.index(i)) if lazy else (lambda x, i: x)
    kind, j = v.labels[0]
    if isinstance(v, sy.Probe):
        ctx.record(v.path, ("index", j))
        return base_xs, lambda x, i: v.replace(base=take(x, i), labels=v.labels[1:])
    if kind != "s":
        return sy.materialize(v, ctx.record, "scan over a non-stacked axis"), lambda x, i: x
    labels = sy.drop_label(v.labels[1:], (kind, j))
    if v.lead:  # a stack of adapters: each step slices its layer (no transposed copy)

        def at(f: jax.Array | None, i: jax.Array) -> jax.Array | None:
            return None if f is None else lax.dynamic_index_in_dim(f, i, j + v.lead, keepdims=False)

        return (base_xs,), lambda x, i: v.replace(
            base=take(x[0], i), a=at(v.a, i), b=at(v.b, i), g=at(v.g, i), labels=labels, active=None
        )

    def first(f: jax.Array | None) -> jax.Array | None:
        return None if f is None else jnp.moveaxis(f, j, 0)

    xs = (base_xs, first(v.a), first(v.b), first(v.g))
    return xs, lambda x, i: v.replace(
        base=take(x[0], i), a=x[1], b=x[2], g=x[3], labels=labels, active=None
    )


def _layer_mask(invals: list) -> tuple[bool, ...] | None:
    """The adapted layers when every scanned-over weight adapts the same subset of its
    stack (``LayersNode``s sliced along that axis), else None (all layers run LoRA)."""
    masks = {
        v.active
        for v in invals
        if isinstance(v, sy.Sym) and v.labels[0] == ("s", 0) and not isinstance(v, sy.Probe)
    }
    return masks.pop() if len(masks) == 1 and None not in masks else None


@register(lax.scan_p)
def _scan(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts, carry = invals[:nc], materialized(invals[nc : nc + ncarry], ctx, "scan carry")
    split = [_scan_slice(v, ctx) for v in invals[nc + ncarry :]]
    xs = [s[0] for s in split]
    steps = jnp.arange(p["length"])  # the layer index of each step (reversed with xs)
    closed = p["jaxpr"]
    keys: list = []  # capture mode: the paths whose input statistics leave each step

    mask = None if ctx.capture is not None else _layer_mask(invals[nc + ncarry :])

    def body(c: list, x: tuple) -> tuple[list, tuple[list, list]]:
        x_vals, step = x
        sub = ctx if ctx.key is None else ctx.fold(step)
        inner = None if ctx.capture is None else ctx.capture.fresh()
        xs_now = [rebuild(xv, step) for (_, rebuild), xv in zip(split, x_vals, strict=True)]

        def run(xs_now: list) -> list:
            return materialized(
                evaluate(
                    closed.jaxpr,
                    closed.consts,
                    list(consts) + list(c) + xs_now,
                    dataclasses.replace(sub, capture=inner),
                ),
                ctx,
                "scan output",
            )

        if mask is None:
            outs = run(xs_now)
        else:  # a layer without factors runs the base alone
            plain = [v.base if isinstance(v, sy.Sym) else v for v in xs_now]
            outs = lax.cond(jnp.asarray(mask)[step], lambda: run(xs_now), lambda: run(plain))
        return outs[:ncarry], (outs[ncarry:], capture.flat(inner, keys))

    carry, (ys, extra) = lax.scan(
        body, carry, (xs, steps), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    capture.merge(ctx.capture, keys, extra)
    return list(carry) + list(ys)


def _no_capture(ctx: Ctx) -> Ctx:
    """Inputs inside a ``cond``/``while`` body are not captured (their weights get no
    statistics, and init_eva says so)."""
    return ctx if ctx.capture is None else dataclasses.replace(ctx, capture=None)


@register(lax.cond_p)
def _cond(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    index, ops = invals[0], invals[1:]

    ctx = _no_capture(ctx)

    def branch(closed: ClosedJaxpr, k: int) -> Callable[..., list]:
        return lambda *vals: materialized(
            evaluate(closed.jaxpr, closed.consts, vals, ctx.fold(k)), ctx, "cond output"
        )

    return list(
        lax.switch(index, [branch(c, k) for k, c in enumerate(eqn.params["branches"])], *ops)
    )


@register(lax.while_p)
def _while(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    p, ctx = eqn.params, _no_capture(ctx)
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = invals[:nc], invals[nc : nc + nb]
    init = materialized(invals[nc + nb :], ctx, "while carry")
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]

    def cond_fun(state: tuple) -> jax.Array:
        return evaluate(cj.jaxpr, cj.consts, list(cconsts) + list(state[0]), ctx)[0]

    def body_fun(state: tuple) -> tuple:
        carry, step = state
        sub = ctx.fold(step)
        outs = evaluate(bj.jaxpr, bj.consts, list(bconsts) + list(carry), sub)
        return materialized(outs, ctx, "while carry"), step + 1

    out, _ = lax.while_loop(cond_fun, body_fun, (init, jnp.zeros((), jnp.int32)))
    return list(out)
