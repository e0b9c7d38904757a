"""``apply``: run any JAX function with LoRA computed factored, by interpreting its jaxpr.

``fn`` is traced once with the base parameters; the jaxpr is then evaluated
equation by equation with each adapted kernel carried as a :class:`Sym`
(``base + s * A @ B``). ``dot_general`` on a Sym runs factored, shape ops keep
it symbolic, control flow (``jit``, ``scan``, ``remat``, ``cond``, ``while``,
custom derivatives) is recursed into, and anything else materializes the
weight for that one use. Only ordinary JAX ops are emitted, so ``jit``,
``grad``, ``vmap`` and sharding compose as usual.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jlora import factored as fa
from jlora import qview as qv
from jlora import symbolic as sy
from jlora.adapter import match
from jlora.check import check_finite
from jlora.multi import check_ids
from jlora.quant import is_nf4
from jlora.targets import flatten, path_str

_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
           "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
           "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}


@dataclasses.dataclass
class _Ctx:
    key: Any = None  # dropout key, folded per site and per loop step
    records: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

    def record(self, path: str, what) -> None:
        self.records[path].append(what)

    def fold(self, i) -> "_Ctx":
        key = None if self.key is None else jax.random.fold_in(self.key, i)
        return _Ctx(key, self.records)


def _has_sym(vals) -> bool:
    """Whether any value is symbolic: an adapted weight or a quantized one."""
    return any(isinstance(v, (sy.Sym, qv.QView)) for v in vals)


def _eval(jaxpr, consts, args, ctx: _Ctx) -> list:
    env: dict = {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        with eqn.ctx.manager:
            if _has_sym(invals):
                outs = _sym_rule(eqn, invals, ctx.fold(i))
            else:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _materialized(vals, ctx: _Ctx, why: str) -> list:
    return [sy.materialize(v, ctx.record, why) for v in vals]


def _sym_rule(eqn, invals, ctx: _Ctx):
    name, params = eqn.primitive.name, eqn.params
    if name == "dot_general":
        lhs, rhs = invals
        if _has_sym([lhs]) and _has_sym([rhs]):  # keep an adapted side symbolic if there is one
            if isinstance(rhs, sy.Sym) and not isinstance(lhs, sy.Sym):
                lhs = sy.materialize(lhs)
            else:
                rhs = sy.materialize(rhs, ctx.record, "dot of two adapted weights")
        if isinstance(rhs, sy.Sym):
            return fa.dot(lhs, rhs, True, params, ctx.key, ctx.record)
        if isinstance(lhs, sy.Sym):
            return fa.dot(rhs, lhs, False, params, ctx.key, ctx.record)
        view_is_rhs = qv.is_view(rhs)
        return qv.dot(rhs if view_is_rhs else lhs, lhs if view_is_rhs else rhs, view_is_rhs,
                      params)
    if name in _INLINE:
        closed = params[_INLINE[name]]
        return _eval(closed.jaxpr, closed.consts, invals, ctx)
    if name in _CONTROL:
        return _CONTROL[name](eqn, invals, ctx)
    if name in _SHAPE and isinstance(invals[0], sy.Sym) and not _has_sym(invals[1:]):
        out = _SHAPE[name](invals[0], invals[1:], params, ctx)
        if out is not None:
            return out
    if qv.is_view(invals[0]) and not _has_sym(invals[1:]):
        return qv.op(invals[0], eqn.primitive, invals[1:], eqn.primitive.get_bind_params(params))
    vals = _materialized(invals, ctx, name)
    return eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(params))


_SHAPE: dict[str, Callable] = {
    "transpose": lambda s, rest, p, ctx: sy.transpose(s, p["permutation"]),
    "convert_element_type": lambda s, rest, p, ctx: sy.convert(s, **p),
    "squeeze": lambda s, rest, p, ctx: sy.squeeze(s, p["dimensions"], ctx.record),
    "slice": lambda s, rest, p, ctx: sy.slice_(s, p["start_indices"], p["limit_indices"],
                                               p["strides"]),
    "dynamic_slice": lambda s, rest, p, ctx: sy.dynamic_slice(s, rest, p["slice_sizes"]),
    "broadcast_in_dim": lambda s, rest, p, ctx: None if rest else sy.expand(s, **p),
    "reshape": lambda s, rest, p, ctx: None if rest else sy.reshape(s, **p),
    "copy": lambda s, rest, p, ctx: s,
}


# ----- control flow ---------------------------------------------------------------------

def _remat(eqn, invals, ctx):
    p = eqn.params

    def body(key, *vals):
        return _materialized(_eval(p["jaxpr"], (), vals, _Ctx(key, ctx.records)), ctx, "remat")

    return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(
        ctx.key, *invals))


def _scan_slice(v, ctx):
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
    if v.probe:
        ctx.record(v.path, ("index", j))
        return base_xs, lambda x, i: v.replace(base=take(x, i), labels=v.labels[1:])
    if kind != "s":
        return sy.materialize(v, ctx.record, "scan over a non-stacked axis"), lambda x, i: x
    labels = sy._drop_label(v.labels[1:], (kind, j))
    first = lambda f: None if f is None else jnp.moveaxis(f, j + v.lead, 0)
    xs = (base_xs, first(v.a), first(v.b), first(v.g))
    return xs, lambda x, i: v.replace(base=take(x[0], i), a=x[1], b=x[2], g=x[3],
                                      labels=labels)


def _scan(eqn, invals, ctx):
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts, carry = invals[:nc], _materialized(invals[nc:nc + ncarry], ctx, "scan carry")
    split = [_scan_slice(v, ctx) for v in invals[nc + ncarry:]]
    xs = [s[0] for s in split]
    steps = jnp.arange(p["length"])  # the layer index of each step (reversed with xs)
    closed = p["jaxpr"]

    def body(c, x):
        x_vals, step = x
        sub = ctx if ctx.key is None else ctx.fold(step)
        vals = list(consts) + list(c) + [rebuild(xv, step)
                                         for (_, rebuild), xv in zip(split, x_vals)]
        outs = _materialized(_eval(closed.jaxpr, closed.consts, vals, sub), ctx, "scan output")
        return outs[:ncarry], outs[ncarry:]

    carry, ys = lax.scan(body, carry, (xs, steps), length=p["length"], reverse=p["reverse"],
                         unroll=p["unroll"])
    return list(carry) + list(ys)


def _cond(eqn, invals, ctx):
    index, ops = invals[0], invals[1:]

    def branch(closed, k):
        return lambda *vals: _materialized(
            _eval(closed.jaxpr, closed.consts, vals, ctx.fold(k)), ctx, "cond output")

    return list(lax.switch(index, [branch(c, k) for k, c in enumerate(eqn.params["branches"])],
                           *ops))


def _while(eqn, invals, ctx):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = invals[:nc], invals[nc:nc + nb]
    init = _materialized(invals[nc + nb:], ctx, "while carry")
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]

    def cond_fun(state):
        return _eval(cj.jaxpr, cj.consts, list(cconsts) + list(state[0]), ctx)[0]

    def body_fun(state):
        carry, step = state
        sub = ctx.fold(step)
        outs = _eval(bj.jaxpr, bj.consts, list(bconsts) + list(carry), sub)
        return _materialized(outs, ctx, "while carry"), step + 1

    out, _ = lax.while_loop(cond_fun, body_fun, (init, jnp.zeros((), jnp.int32)))
    return list(out)


_CONTROL = {"remat2": _remat, "checkpoint": _remat, "scan": _scan, "cond": _cond,
            "while": _while}


# ----- entry points -----------------------------------------------------------------------

def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or is_nf4(x)


def _spec(x) -> jax.ShapeDtypeStruct:
    """What ``fn`` is traced with: an NF4 leaf looks like its dequantized weight."""
    if is_nf4(x):
        return jax.ShapeDtypeStruct(x.shape, x.compute_dtype)
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


def _trace(fn, params, args, kwargs):
    """jaxpr of ``fn(params, *args, **kwargs)`` over its array leaves (others are static)."""
    flat, tree = jax.tree_util.tree_flatten((params, args, kwargs), is_leaf=is_nf4)
    dyn = [i for i, x in enumerate(flat) if _is_array(x)]

    def flat_fn(*vals):
        full = list(flat)
        for i, v in zip(dyn, vals):
            full[i] = v
        p, a, k = jax.tree_util.tree_unflatten(tree, full)
        return fn(p, *a, **k)

    specs = [_spec(flat[i]) for i in dyn]
    closed, shapes = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
    for kp, leaf in flatten(params)[0]:
        if not _is_array(leaf):
            raise TypeError(f"params leaf {path_str(kp)!r} is a {type(leaf).__name__}, not an "
                            "array; pass static settings as arguments of fn, not in params")
    return closed, jax.tree_util.tree_structure(shapes), [flat[i] for i in dyn]


def _run(fn, params, adapter, args, kwargs, ctx: _Ctx, adapter_ids=None):
    nodes = match(params, adapter)
    ids = check_ids(nodes, adapter_ids)
    closed, out_tree, dyn = _trace(fn, params, args, kwargs)
    flat = flatten(params)[0]
    syms = [sy.from_node(qv.wrap(leaf), node, path_str(kp), ids=ids)
            for (kp, leaf), node in zip(flat, nodes)]
    vals = syms + dyn[len(syms):]
    outs = _eval(closed.jaxpr, closed.consts, vals, ctx)
    return jax.tree_util.tree_unflatten(out_tree, _materialized(outs, ctx, "returned"))


def apply(fn: Callable, *, safe: bool = False) -> Callable:
    """Turn ``fn(params, *args)`` into ``f(params, adapter, *args, lora_rng=None,
    adapter_ids=None, **kwargs)``.

    Adapted kernels are computed factored: ``x @ W0 + s * (dropout(x) @ A) @ B``,
    never forming the full-size weight or its gradient. Dropout (the adapter's
    rate, on the LoRA input only) runs only when ``lora_rng`` is given, with a
    different mask at every site and every loop step. Wrap the result in
    ``jax.jit``: ``fn`` is traced once per input shape.

    With a stacked adapter (``jlora.stack``), ``adapter_ids[i]`` picks the adapter
    of example ``i`` (``-1``: the base alone), in one batched pass. Every input
    that meets an adapted weight must have the example axis leading (or batch
    and sequence flattened into the leading axis, batch outermost).

    ``safe=True`` first checks params, adapter and the array arguments for NaN/Inf
    and raises a ``LoraError`` naming the first bad one (under ``jit`` it raises
    when the call runs); it costs one reduction per array.

    Example:
      >>> w = {"q_proj": {"kernel": jnp.ones((4, 6))}}
      >>> ad = jlora.init(jax.random.key(0), w, jlora.LoraConfig(rank=2, targets=("q_proj",)))
      >>> f = jlora.apply(lambda p, x: x @ p["q_proj"]["kernel"])
      >>> f(w, ad, jnp.ones((3, 4))).shape
      (3, 6)
    """
    @functools.wraps(fn)
    def wrapped(params, adapter, *args, lora_rng=None, adapter_ids=None, **kwargs):
        if safe:
            fix = ("find where it came from (jax.config.update('jax_debug_nans', True)); "
                   "safe=False turns these checks off")
            for what, tree in (("params", params), ("adapter", adapter), ("args", args),
                               ("kwargs", kwargs)):
                check_finite(tree, what, fix)
        return _run(fn, params, adapter, args, kwargs, _Ctx(key=lora_rng), adapter_ids)
    return wrapped


def explain(fn: Callable, params, adapter, *args, **kwargs) -> dict[str, list[str]]:
    """How each adapted leaf is used by ``fn``: ``'factored'`` or ``'materialized (why)'``.

    Traces only (no computation). One entry per use site, in program order;
    a target that ``fn`` never reads maps to an empty list.
    """
    ctx = _Ctx()
    jax.eval_shape(lambda p, ad: _run(fn, p, ad, args, kwargs, ctx), params, adapter)
    adapted = [path_str(kp) for (kp, _), n in zip(flatten(params)[0], match(params, adapter))
               if n is not None]
    return {p: list(ctx.records.get(p, [])) for p in adapted}


def discover_axes(fn, params, paths: set[str], args, kwargs) -> dict[str, tuple]:
    """Learn ``(stack_axes, in_axes, out_axes)`` per path from how ``fn`` contracts it.

    Contracted axes are "in", axes indexed, scanned over or batched in the
    contraction are "stacked", the rest "out". Paths ``fn`` never contracts
    are left out (the caller falls back to the default convention).
    """
    ctx = _Ctx()
    closed, _, dyn = _trace(fn, params, args, kwargs)
    flat = flatten(params)[0]
    vals = []
    for kp, leaf in flat:
        p, leaf = path_str(kp), qv.wrap(leaf)
        labels = tuple(("p", ax) for ax in range(leaf.ndim))
        vals.append(sy.Sym(leaf, None, None, None, labels, 0.0, 0.0, p) if p in paths else leaf)
    jax.eval_shape(lambda v: _eval(closed.jaxpr, closed.consts, v, ctx), vals + dyn[len(vals):])
    found = {}
    for path in paths:
        events = ctx.records.get(path, [])
        dots = [e for e in events if isinstance(e, tuple) and e[0] == "dot"]
        if not dots:
            continue
        ndim = next(l for kp, l in flat if path_str(kp) == path).ndim
        stack = {e[1] for e in events if isinstance(e, tuple) and e[0] == "index"}
        stack |= set(dots[0][2])
        ins = tuple(sorted(dots[0][1]))
        outs = tuple(ax for ax in range(ndim) if ax not in stack and ax not in ins)
        if not ins or not outs:
            continue
        found[path] = (tuple(sorted(stack)), ins, outs)
    return found
