"""One forward walker over a jaxpr, parameterized by a domain.

A dataflow analysis gives each value of a jaxpr an abstract value (where the
example axis lies, where the mask's token axes lie) and runs forward equation by
equation. What differs between analyses is the *domain*: its values, how two
values join, and one rule per primitive (:class:`Domain`). What they share is the
machinery here: reading literals, recursing into call-like primitives (``jit``,
``closed_call``, ``remat``, the opt-in "hi" primitives), joining ``cond``
branches, and running ``scan``/``while`` bodies to a fixed point. JAX keeps one
rule table per transformation over shared tracing machinery in the same way.

The walker owns its side table: :class:`Sites` records, for every
``dot_general`` equation it passed (sub-jaxprs included), the values of its two
operands. The evaluator reads that table by equation; both walk the same jaxpr
objects, because a "hi" primitive's sub-jaxpr is traced once per ``apply`` call
and kept in :class:`Expanded`, which the evaluator's context shares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import jax
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as jprims

from jlora._src.numerics import mesh

V = TypeVar("V")


def primitives(*names: str) -> list[jcore.Primitive]:
    """The objects ``jax.extend.core.primitives.<name>`` that this JAX has (renames differ)."""
    return [p for n in names if (p := getattr(jprims, n, None)) is not None]


#: ``rule(eqn, ins) -> [value per output]``: a domain's rule for one primitive.
Rule = Callable[[Any, list], list]

#: Call-like primitives this JAX exports (current and former names) -> their jaxpr's param.
CALLS = {
    p: field
    for names, field in (
        (("jit_p", "pjit_p"), "jaxpr"),
        (("closed_call_p", "call_p", "custom_jvp_call_p", "custom_vjp_call_p"), "call_jaxpr"),
    )
    for p in primitives(*names)
}
_SUBJAXPR = {**CALLS, **dict.fromkeys(primitives("remat_p"), "jaxpr")}


def _lax(names: str) -> frozenset:
    return frozenset(getattr(lax, n) for n in names.split() if hasattr(lax, n))


# Families of primitives the domains give one rule each.
#: Elementwise ops (and ones that only annotate a value): axes pass through unchanged.
ELEMENTWISE = _lax("""
    add_p sub_p mul_p div_p max_p min_p pow_p atan2_p rem_p nextafter_p and_p or_p xor_p
    not_p neg_p sign_p floor_p ceil_p round_p is_finite_p exp_p exp2_p log_p log1p_p expm1_p
    tanh_p logistic_p sin_p cos_p tan_p asin_p acos_p atan_p sinh_p cosh_p asinh_p acosh_p
    atanh_p sqrt_p rsqrt_p cbrt_p abs_p square_p integer_pow_p erf_p erfc_p erf_inv_p
    lgamma_p digamma_p select_n_p clamp_p eq_p ne_p lt_p le_p gt_p ge_p
    convert_element_type_p copy_p reduce_precision_p real_p imag_p stop_gradient_p
    shift_left_p shift_right_logical_p shift_right_arithmetic_p population_count_p
    sharding_constraint_p
""") | frozenset(getattr(jprims, n) for n in ("name_p",) if hasattr(jprims, n))
#: Reductions over ``params["axes"]``.
REDUCE = _lax("""
    reduce_sum_p reduce_max_p reduce_min_p reduce_prod_p reduce_and_p reduce_or_p
    reduce_xor_p argmax_p argmin_p
""")
#: Scans along ``params["axis"]``.
CUMULATIVE = _lax("cumsum_p cumprod_p cummax_p cummin_p cumlogsumexp_p")


def aval_shape(v: Any) -> tuple[int, ...]:
    """The shape of a jaxpr variable or literal (its abstract value's)."""
    return tuple(v.aval.shape)


def _slice_keeps(eqn: Any, ax: int) -> bool:
    p = eqn.params
    step = 1 if p["strides"] is None else p["strides"][ax]
    whole = (0, eqn.invars[0].aval.shape[ax], 1)
    return (p["start_indices"][ax], p["limit_indices"][ax], step) == whole


def _dynamic_slice_keeps(eqn: Any, ax: int) -> bool:
    return eqn.params["slice_sizes"][ax] == eqn.invars[0].aval.shape[ax]


def _pad_keeps(eqn: Any, ax: int) -> bool:
    return tuple(eqn.params["padding_config"][ax]) == (0, 0, 0)


def _rev_keeps(eqn: Any, ax: int) -> bool:
    return ax not in eqn.params["dimensions"]


def _update_keeps(eqn: Any, ax: int) -> bool:
    return eqn.invars[1].aval.shape[ax] == eqn.invars[0].aval.shape[ax]


#: Slice-like primitives: ``keeps(eqn, ax)``, whether they leave axis ``ax`` whole.
KEEPS: dict[Any, Callable[[Any, int], bool]] = {
    lax.slice_p: _slice_keeps,
    lax.dynamic_slice_p: _dynamic_slice_keeps,
    lax.pad_p: _pad_keeps,
    lax.rev_p: _rev_keeps,
    lax.dynamic_update_slice_p: _update_keeps,
}


def dot_axis(eqn: Any, side: int, axis: int) -> int | None:
    """Where axis ``axis`` of ``dot_general`` operand ``side`` lies in its output (batch
    dims, then the lhs's free ones, then the rhs's), or None where it is contracted."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contracted, batch = (lc, lb) if side == 0 else (rc, rb)
    if axis in contracted:
        return None
    if axis in batch:
        return list(batch).index(axis)
    ranks = [len(v.aval.shape) for v in eqn.invars]
    free = [ax for ax in range(ranks[side]) if ax not in contracted and ax not in batch]
    lhs_free = ranks[0] - len(lc) - len(lb)
    return len(lb) + (0 if side == 0 else lhs_free) + free.index(axis)


#: The primitives whose operands' values the walker records in its :class:`Sites`.
RECORDED = frozenset({lax.dot_general_p})
#: Loop bodies run at most this many times to reach a fixed point (a domain's lattice
#: must be shallower: the example axis has 3 levels, a token placement 3 per component).
LOOP_PASSES = 4


class Expanded(dict):
    """``call_hi_primitive`` equation -> its primal computation as a closed jaxpr, traced
    once, so that every walk over one jaxpr (the analyses and the evaluator) sees the same
    sub-jaxpr objects. One per ``apply`` call; keyed by the equation (identity hash)."""

    def of(self, eqn: Any) -> Any:
        closed = self.get(eqn)
        if closed is None:
            hi = eqn.params["_prim"]

            def lo(*flat: Any) -> list:
                return jax.tree.leaves(hi.expand(*jax.tree.unflatten(hi.in_tree, flat)))

            closed = jax.make_jaxpr(lo)(*[mesh.struct(v.aval) for v in eqn.invars])
            self[eqn] = closed
        return closed


class Sites(dict):
    """``dot_general`` equation -> the domain values of its two operands, for every dot
    the walker passed; keyed by the equation object (identity hash)."""

    def operand(self, eqn: Any, side: int, default: Any = None) -> Any:
        """The value of operand ``side`` of ``eqn`` (``default``: a dot never reached)."""
        got = self.get(eqn)
        return default if got is None else got[side]


class Domain(Generic[V]):
    """What an analysis supplies to the walker. ``bottom`` is the value of everything the
    analysis does not follow (literals, the parameters); ``rules`` maps primitive objects
    to ``rule(eqn, ins) -> [value per output]``, run when some input is not bottom."""

    bottom: V
    rules: dict
    #: What the values follow, for the reasons a lost value gives ("examples", "tokens").
    what: str = "values"

    def unknown(self, eqn: Any, ins: list) -> V:
        """The value of an output of a primitive with no rule."""
        raise NotImplementedError

    def join(self, values: Sequence[V], why: str) -> V:
        """One value for values that meet: ``cond`` branches, a loop's carry in and out."""
        raise NotImplementedError

    def moved(self, value: V, delta: int) -> V:
        """The value with its axes shifted by ``delta`` (a scan's ``ys`` gain axis 0)."""
        raise NotImplementedError

    def scanned(self, value: V) -> V:
        """A scan's ``xs`` inside the body: axis 0 is the loop's; the rest move down."""
        raise NotImplementedError

    def unstable(self, value: V) -> V:
        """A loop carry that did not reach a fixed point in :data:`LOOP_PASSES` passes."""
        raise NotImplementedError

    def conflict(self, old: tuple, new: tuple) -> tuple:
        """A dot met twice with different operands (a sub-jaxpr called twice)."""
        raise NotImplementedError


class Walker(Generic[V]):
    """Runs ``domain`` forward over jaxprs, recording each dot's operands in ``sites``."""

    def __init__(self, domain: Domain[V], expanded: Expanded | None = None) -> None:
        self.domain = domain
        self.expanded = Expanded() if expanded is None else expanded
        self.sites = Sites()

    def run(self, jaxpr: Any, ins: Sequence[V], sites: Sites | None = None) -> list:
        """The values of ``jaxpr``'s outputs; dots recorded in ``sites`` (default: the
        walker's own table; a scratch table for a loop's trial passes)."""
        sites = self.sites if sites is None else sites
        bottom = self.domain.bottom
        env = dict(zip(jaxpr.invars, ins, strict=True))

        def read(v: Any) -> V:
            return bottom if isinstance(v, jcore.Literal) else env.get(v, bottom)

        for eqn in jaxpr.eqns:
            outs = self._eqn(eqn, [read(v) for v in eqn.invars], sites)
            env.update(zip(eqn.outvars, outs, strict=True))
        return [read(v) for v in jaxpr.outvars]

    def _eqn(self, eqn: Any, ins: list, sites: Sites) -> list:
        prim = eqn.primitive
        if prim in RECORDED:
            ins = self._site(eqn, ins, sites)
        elif prim in _SUBJAXPR:
            sub = eqn.params[_SUBJAXPR[prim]]
            return self.run(getattr(sub, "jaxpr", sub), ins, sites)
        elif prim.name == "call_hi_primitive":  # no exported primitive object
            return self.run(self.expanded.of(eqn).jaxpr, ins, sites)
        elif prim in CONTROL:
            return CONTROL[prim](self, eqn, ins, sites)
        if all(a == self.domain.bottom for a in ins):
            return [self.domain.bottom] * len(eqn.outvars)
        rule = self.domain.rules.get(prim)
        if rule is None:
            return [self.domain.unknown(eqn, ins)] * len(eqn.outvars)
        return rule(eqn, ins)

    def _site(self, eqn: Any, ins: list, sites: Sites) -> list:
        new = tuple(ins)
        if eqn in sites and sites[eqn] != new:
            new = self.domain.conflict(sites[eqn], new)
        sites[eqn] = new
        return list(new)

    def _cond(self, eqn: Any, ins: list, sites: Sites) -> list:
        outs = [self.run(b.jaxpr, ins[1:], sites) for b in eqn.params["branches"]]
        why = f"cond branches that put the {self.domain.what} on different axes"
        return [self.domain.join(o, why) for o in zip(*outs, strict=True)]

    def _fixed_point(
        self, body: Callable[[list, Sites], list], carry: list, sites: Sites
    ) -> tuple[list, list]:
        """Carry values that a loop body keeps, and the body's outputs from one last pass
        with them: only that pass records its dots, so a carry that starts
        analysis-independent (zeros) and then takes a value is fine."""
        join = self.domain.join
        for _ in range(LOOP_PASSES):
            outs = body(carry, Sites())
            new = [
                join([c, o], f"a loop carry whose {self.domain.what} move")
                for c, o in zip(carry, outs[: len(carry)], strict=True)
            ]
            if new == carry:
                break
            carry = new
        else:
            carry = [self.domain.unstable(c) for c in carry]
        return carry, body(carry, sites)

    def _scan(self, eqn: Any, ins: list, sites: Sites) -> list:
        p = eqn.params
        nc, ncarry = p["num_consts"], p["num_carry"]
        consts, xs = list(ins[:nc]), [self.domain.scanned(a) for a in ins[nc + ncarry :]]

        def body(carry: list, rec: Sites) -> list:
            return self.run(p["jaxpr"].jaxpr, consts + carry + xs, rec)

        carry, outs = self._fixed_point(body, list(ins[nc : nc + ncarry]), sites)
        return carry + [self.domain.moved(a, 1) for a in outs[ncarry:]]

    def _while(self, eqn: Any, ins: list, sites: Sites) -> list:
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        consts = list(ins[nc : nc + nb])

        def body(carry: list, rec: Sites) -> list:
            return self.run(p["body_jaxpr"].jaxpr, consts + carry, rec)

        return self._fixed_point(body, list(ins[nc + nb :]), sites)[0]


#: Control flow the walker runs itself (the domain's join and fixed point).
CONTROL = {lax.cond_p: Walker._cond, lax.scan_p: Walker._scan, lax.while_p: Walker._while}
