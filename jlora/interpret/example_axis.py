"""Where the example axis goes: a dataflow pass over the jaxpr for mixed-adapter batches.

In a batch that mixes adapters, each row of an adapted weight's input must use
its own example's factors, so the interpreter must know which axis of that input
is the example axis. Guessing from shapes is wrong whenever a model reorders
axes; this pass follows the axis from the arguments through every equation.

Each value gets one of: ``None`` (the same for every example), ``(axis, inner)``
(index ``i`` of ``axis`` belongs to example ``i // inner``: ``inner`` is 1 for the
batch axis itself, the sequence length for batch and sequence flattened batch
outermost), or :class:`Lost` (examples are mixed, or a primitive this pass has no
rule for touched the axis). :func:`analyze` returns the annotations of both
operands of every ``dot_general``, keyed by the equation; the ``dot_general``
rule refuses an input whose example axis is lost or absent, never guessing.

Like ``core.RULES``, it dispatches on primitive objects: ``RULES`` (ops a value flows
through) and ``WALKS`` (sub-jaxprs and the dots it records); a new op is one entry.
"""

from __future__ import annotations

import dataclasses
import math

from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as jprims

from jlora.interpret.control import CALLS, hi_jaxpr
from jlora.interpret.core import primitives
from jlora.interpret.sym import reshape_groups


@dataclasses.dataclass(frozen=True)
class Lost:
    """The example axis could not be followed; ``why`` names where."""

    why: str


_ELEMENTWISE = frozenset(
    getattr(lax, n)
    for n in (
        "add_p",
        "sub_p",
        "mul_p",
        "div_p",
        "max_p",
        "min_p",
        "pow_p",
        "atan2_p",
        "rem_p",
        "nextafter_p",
        "and_p",
        "or_p",
        "xor_p",
        "not_p",
        "neg_p",
        "sign_p",
        "floor_p",
        "ceil_p",
        "round_p",
        "is_finite_p",
        "exp_p",
        "exp2_p",
        "log_p",
        "log1p_p",
        "expm1_p",
        "tanh_p",
        "logistic_p",
        "sin_p",
        "cos_p",
        "tan_p",
        "asin_p",
        "acos_p",
        "atan_p",
        "sinh_p",
        "cosh_p",
        "asinh_p",
        "acosh_p",
        "atanh_p",
        "sqrt_p",
        "rsqrt_p",
        "cbrt_p",
        "abs_p",
        "square_p",
        "integer_pow_p",
        "erf_p",
        "erfc_p",
        "erf_inv_p",
        "lgamma_p",
        "digamma_p",
        "select_n_p",
        "clamp_p",
        "eq_p",
        "ne_p",
        "lt_p",
        "le_p",
        "gt_p",
        "ge_p",
        "convert_element_type_p",
        "copy_p",
        "reduce_precision_p",
        "real_p",
        "imag_p",
        "stop_gradient_p",
        "shift_left_p",
        "shift_right_logical_p",
        "shift_right_arithmetic_p",
        "population_count_p",
        "sharding_constraint_p",
    )
    if hasattr(lax, n)
) | frozenset(getattr(jprims, n) for n in ("name_p",) if hasattr(jprims, n))  # checkpoint_name
_REDUCE = frozenset(
    getattr(lax, n)
    for n in (
        "reduce_sum_p",
        "reduce_max_p",
        "reduce_min_p",
        "reduce_prod_p",
        "reduce_and_p",
        "reduce_or_p",
        "reduce_xor_p",
        "argmax_p",
        "argmin_p",
    )
    if hasattr(lax, n)
)
_CUMULATIVE = frozenset(
    getattr(lax, n)
    for n in ("cumsum_p", "cumprod_p", "cummax_p", "cummin_p", "cumlogsumexp_p")
    if hasattr(lax, n)
)
_CALLS = {**CALLS, **{p: "jaxpr" for p in primitives("remat_p")}}


def merge(annots, why: str):
    """One annotation for values that must agree (None agrees with anything)."""
    found = {a for a in annots if a is not None}
    if any(isinstance(a, Lost) for a in found):
        return next(a for a in found if isinstance(a, Lost))
    return found.pop() if len(found) == 1 else (None if not found else Lost(why))


def _moved(a, new_axis):
    return None if a is None or isinstance(a, Lost) else (new_axis(a[0]), a[1])


def _reshape(a, old, new):
    """``(axis, inner)`` through a reshape: the axis must lead its merged group, and the
    new group's axes before the one that takes it must be size 1."""
    axis, inner = a
    groups = reshape_groups(tuple(old), tuple(new))
    if groups is None:
        return Lost("reshape")
    gi, gj = next((gi, gj) for gi, gj in groups if axis in gi)
    if any(old[g] != 1 for g in gi[: gi.index(axis)]):
        return Lost("reshape that puts the examples inside another axis")
    period = inner * math.prod(old[g] for g in gi[gi.index(axis) + 1 :])  # rows per example
    for j in gj:
        after = math.prod(new[h] for h in gj[gj.index(j) + 1 :])
        if after <= period and period % after == 0:
            return (j, period // after)
        if new[j] != 1:
            break
    return Lost("reshape that splits the examples over two axes")


def _dot(eqn, ins):
    """Output layout of dot_general: batch dims, then lhs free, then rhs free."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    nl, nr = (len(v.aval.shape) for v in eqn.invars)
    lfree = [ax for ax in range(nl) if ax not in lc and ax not in lb]
    rfree = [ax for ax in range(nr) if ax not in rc and ax not in rb]
    outs = []
    for a, contracted, batch, free, shift in (
        (ins[0], lc, lb, lfree, len(lb)),
        (ins[1], rc, rb, rfree, len(lb) + len(lfree)),
    ):
        if a is None or isinstance(a, Lost):
            outs.append(a)
        elif a[0] in contracted:
            outs.append(Lost("a dot_general that contracts the examples"))
        else:
            outs.append(
                (list(batch).index(a[0]) if a[0] in batch else shift + free.index(a[0]), a[1])
            )
    return merge(outs, "a dot_general of two inputs that each carry the examples")


#: Ops that see the examples: ``rule(eqn, ins) -> [annotation per output]``, run when some
#: input carries them; an op with no rule loses the axis (a mixed batch is refused).
RULES: dict = {}
#: Primitives that hold sub-jaxprs or record ``dot_general`` sites: ``walk(eqn, ins,
#: sites) -> [annotation per output]``, run for every equation of their kind.
WALKS: dict = {}


def _on(*prims, merged: bool = True):
    """Register ``fn(eqn, a) -> annotation`` for ``prims``: ``a`` is the inputs' one
    example axis (``merged``; a disagreement or a lost input passes through as Lost),
    or the raw list of input annotations."""

    def register(fn):
        def rule(eqn, ins):
            if not merged:
                return [fn(eqn, ins)]
            a = merge(ins, f"{eqn.primitive.name} of inputs whose examples lie on different axes")
            return [a if isinstance(a, Lost) else fn(eqn, a)]

        RULES.update(dict.fromkeys((p for p in prims if p is not None), rule))
        return fn

    return register


_on(*_ELEMENTWISE)(lambda eqn, a: a)


@_on(lax.gather_p, merged=False)
def _gather(eqn, ins):
    """An embedding lookup: rows follow the indices' example axis."""
    operand, indices = ins
    dn = eqn.params["dimension_numbers"]
    if operand is not None or getattr(dn, "operand_batching_dims", ()):
        return Lost("gather from an array that carries the examples")
    if isinstance(indices, Lost):
        return indices
    n_out = len(eqn.outvars[0].aval.shape)
    batch_out = [d for d in range(n_out) if d not in dn.offset_dims]
    if indices[0] >= len(eqn.invars[1].aval.shape) - 1:
        return Lost("gather indexed along the examples")
    return (batch_out[indices[0]], indices[1])


def _slice_keeps(eqn, ax) -> bool:
    p, step = eqn.params, 1 if eqn.params["strides"] is None else eqn.params["strides"][ax]
    return (p["start_indices"][ax], p["limit_indices"][ax], step) == (
        0,
        eqn.invars[0].aval.shape[ax],
        1,
    )


#: Slice-like primitives: whether one leaves axis ``ax`` (the examples') whole.
_KEEPS = {
    lax.slice_p: _slice_keeps,
    lax.dynamic_slice_p: lambda eqn, ax: (
        eqn.params["slice_sizes"][ax] == eqn.invars[0].aval.shape[ax]
    ),
    lax.pad_p: lambda eqn, ax: tuple(eqn.params["padding_config"][ax]) == (0, 0, 0),
    lax.rev_p: lambda eqn, ax: ax not in eqn.params["dimensions"],
    lax.dynamic_update_slice_p: lambda eqn, ax: (
        eqn.invars[1].aval.shape[ax] == eqn.invars[0].aval.shape[ax]
    ),
}
_on(*_KEEPS)(
    lambda eqn, a: (
        a if _KEEPS[eqn.primitive](eqn, a[0]) else Lost(f"{eqn.primitive.name} along the examples")
    )
)
_on(lax.concatenate_p)(
    lambda eqn, a: Lost("concatenate along the examples") if eqn.params["dimension"] == a[0] else a
)
_on(*_CUMULATIVE)(
    lambda eqn, a: (
        Lost(f"{eqn.primitive.name} along the examples") if eqn.params["axis"] == a[0] else a
    )
)
_on(lax.reshape_p)(lambda eqn, a: _reshape(a, eqn.invars[0].aval.shape, eqn.params["new_sizes"]))
_on(lax.transpose_p)(lambda eqn, a: (list(eqn.params["permutation"]).index(a[0]), a[1]))


@_on(lax.broadcast_in_dim_p)
def _broadcast(eqn, a):
    dims = eqn.params["broadcast_dimensions"]
    same = eqn.params["shape"][dims[a[0]]] == eqn.invars[0].aval.shape[a[0]]
    return (dims[a[0]], a[1]) if same else Lost("broadcast_in_dim of the examples")


def _drop_axes(param: str):
    def rule(eqn, a):
        axes = eqn.params[param]
        if a[0] in axes:
            return Lost(f"{eqn.primitive.name} over the examples")
        return (a[0] - sum(d < a[0] for d in axes), a[1])

    return rule


_on(lax.squeeze_p)(_drop_axes("dimensions"))
_on(*_REDUCE)(_drop_axes("axes"))


def _split(eqn, ins):
    lost = isinstance(ins[0], tuple) and ins[0][0] == eqn.params["axis"]
    return [Lost("split along the examples") if lost else ins[0]] * len(eqn.outvars)


RULES.update({p: _split for p in [getattr(lax, "split_p", None)] if p is not None})


def _eqn(eqn, ins, sites: dict) -> list:
    prim = eqn.primitive
    walk = WALKS.get(prim) or (_hi if prim.name == "call_hi_primitive" else None)
    if walk is not None:
        return walk(eqn, ins, sites)
    if all(a is None for a in ins):
        return [None] * len(eqn.outvars)
    rule = RULES.get(prim)
    return rule(eqn, ins) if rule is not None else [Lost(prim.name)] * len(eqn.outvars)


def _dot_walk(eqn, ins, sites):
    _site(sites, eqn, ins)
    return [_dot(eqn, ins)]


def _call(eqn, ins, sites):
    sub = eqn.params[_CALLS[eqn.primitive]]
    return analyze(getattr(sub, "jaxpr", sub), ins, sites)


def _hi(eqn, ins, sites):  # jax_remat3 / jax_custom_vjp3: no exported primitive object
    return analyze(hi_jaxpr(eqn).jaxpr, ins, sites)


def _cond(eqn, ins, sites):
    outs = [analyze(b.jaxpr, ins[1:], sites) for b in eqn.params["branches"]]
    return [merge(o, "cond branches that put the examples on different axes") for o in zip(*outs)]


def _site(sites: dict, eqn, ins) -> None:
    key = id(eqn)
    if key in sites and sites[key][1] != tuple(ins):
        ins = [Lost("a sub-computation called with different example layouts")] * 2
    sites[key] = (eqn, tuple(ins))


def _fixed_point(body, consts, carry, rest, sites):
    """Carry annotations that a loop body keeps (a carry that moves is lost), and the
    body's outputs from one last pass with them: only that pass records its dots, so a
    carry that starts example-independent (zeros) and then takes the examples is fine."""
    for _ in range(3):
        outs = body(consts, carry, rest, {})
        new = [
            merge([c, o], "a loop carry whose examples move")
            for c, o in zip(carry, outs[: len(carry)])
        ]
        if new == carry:
            break
        carry = new
    else:
        carry = [Lost("a loop carry whose examples move")] * len(carry)
    return carry, body(consts, carry, rest, sites)


def _scan(eqn, ins, sites):
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    xs = [
        None
        if a is None or isinstance(a, Lost)
        else (Lost("scan over the examples") if a[0] == 0 else (a[0] - 1, a[1]))
        for a in ins[nc + ncarry :]
    ]
    body = lambda c, carry, x, rec: analyze(p["jaxpr"].jaxpr, list(c) + list(carry) + list(x), rec)
    carry, outs = _fixed_point(body, ins[:nc], list(ins[nc : nc + ncarry]), xs, sites)
    ys = [_moved(a, lambda ax: ax + 1) for a in outs[ncarry:]]
    return list(carry) + ys


def _while(eqn, ins, sites):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    body = lambda c, carry, _, rec: analyze(p["body_jaxpr"].jaxpr, list(c) + list(carry), rec)
    carry, _ = _fixed_point(body, ins[nc : nc + nb], list(ins[nc + nb :]), (), sites)
    return carry


def analyze(jaxpr, in_annots, sites: dict | None = None) -> list:
    """Annotations of ``jaxpr``'s outputs; records each ``dot_general``'s operands in
    ``sites`` (``{id(eqn): (eqn, (lhs, rhs))}``)."""
    sites = {} if sites is None else sites
    env = dict(zip(jaxpr.invars, in_annots))
    read = lambda v: None if isinstance(v, jcore.Literal) else env.get(v)
    for eqn in jaxpr.eqns:
        outs = _eqn(eqn, [read(v) for v in eqn.invars], sites)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


WALKS.update(
    {
        lax.dot_general_p: _dot_walk,
        lax.scan_p: _scan,
        lax.while_p: _while,
        lax.cond_p: _cond,
        **dict.fromkeys(_CALLS, _call),
    }
)
