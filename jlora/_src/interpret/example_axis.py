"""Where the example axis goes: a dataflow domain for mixed-adapter batches.

In a batch that mixes adapters, each row of an adapted weight's input must use
its own example's factors, so the interpreter must know which axis of that input
is the example axis. Guessing from shapes is wrong whenever a model reorders
axes; this domain follows the axis from the arguments through every equation,
run by the generic walker (:mod:`jlora._src.interpret.walk`).

Each value gets one of: ``None`` (the same for every example), :class:`Axis`
(index ``i`` of ``axis`` belongs to example ``i // inner``: ``inner`` is 1 for the
batch axis itself, the sequence length for batch and sequence flattened batch
outermost), or :class:`Lost` (examples are mixed, or a primitive this domain has no
rule for touched the axis). :func:`analyze` returns the walker's sites: the values
of both operands of every ``dot_general``; the ``dot_general`` rule refuses an input
whose example axis is lost or absent, never guessing.

Like ``core.RULES``, :data:`RULES` is keyed by primitive objects; a new op is one entry.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from jax import lax

from jlora._src.interpret import walk
from jlora._src.interpret.sym import reshape_groups


@dataclasses.dataclass(frozen=True)
class Axis:
    """Index ``i`` of ``axis`` belongs to example ``i // inner``."""

    axis: int
    inner: int = 1

    def to(self, axis: int) -> Axis:
        return Axis(axis, self.inner)


@dataclasses.dataclass(frozen=True)
class Lost:
    """The example axis could not be followed; ``why`` names where."""

    why: str


#: A value of this domain: the same for every example, an axis, or lost.
Where = Axis | Lost | None


def merge(annots: Sequence[Where], why: str) -> Where:
    """One value for values that must agree (None agrees with anything)."""
    found = {a for a in annots if a is not None}
    lost = [a for a in found if isinstance(a, Lost)]
    if lost:
        return lost[0]
    if not found:
        return None
    return found.pop() if len(found) == 1 else Lost(why)


def _reshape(a: Axis, old: Sequence[int], new: Sequence[int]) -> Where:
    """An axis through a reshape: it must lead its merged group, and the new group's axes
    before the one that takes it must be size 1."""
    groups = reshape_groups(tuple(old), tuple(new))
    if groups is None:
        return Lost("reshape")
    gi, gj = next((gi, gj) for gi, gj in groups if a.axis in gi)
    k = gi.index(a.axis)
    if any(old[g] != 1 for g in gi[:k]):
        return Lost("reshape that puts the examples inside another axis")
    period = a.inner * math.prod(old[g] for g in gi[k + 1 :])  # rows per example
    for n, j in enumerate(gj):
        after = math.prod(new[h] for h in gj[n + 1 :])
        if after <= period and period % after == 0:
            return Axis(j, period // after)
        if new[j] != 1:
            break
    return Lost("reshape that splits the examples over two axes")


def _dot(eqn: Any, ins: list) -> list:
    outs: list[Where] = []
    for side, a in enumerate(ins):
        if not isinstance(a, Axis):
            outs.append(a)
            continue
        axis = walk.dot_axis(eqn, side, a.axis)
        contracted = Lost("a dot_general that contracts the examples")
        outs.append(contracted if axis is None else a.to(axis))
    return [merge(outs, "a dot_general of two inputs that each carry the examples")]


#: Ops that see the examples: ``rule(eqn, ins) -> [value per output]``, run when some
#: input carries them; an op with no rule loses the axis (a mixed batch is refused).
RULES: dict = {}

#: ``fn(eqn, a) -> value``: a rule on the inputs' one example axis.
OneAxis = Callable[[Any, Axis], Where]


def _on(*prims: Any) -> Callable[[OneAxis], OneAxis]:
    """Register ``fn(eqn, a) -> value`` for ``prims``: ``a`` is the inputs' one example
    axis (a disagreement or a lost input passes through as Lost)."""

    def register(fn: OneAxis) -> OneAxis:
        def rule(eqn: Any, ins: list) -> list:
            why = f"{eqn.primitive.name} of inputs whose examples lie on different axes"
            a = merge(ins, why)
            return [fn(eqn, a) if isinstance(a, Axis) else a] * len(eqn.outvars)

        RULES.update(dict.fromkeys(prims, rule))
        return fn

    return register


@_on(*walk.ELEMENTWISE)
def _same(eqn: Any, a: Axis) -> Where:
    return a


def _gather(eqn: Any, ins: list) -> list:
    """An embedding lookup: rows follow the indices' example axis."""
    operand, indices = ins
    dn = eqn.params["dimension_numbers"]
    batching = getattr(dn, "operand_batching_dims", ())
    if operand is not None or batching:
        return [Lost("gather from an array that carries the examples")]
    if not isinstance(indices, Axis):
        return [indices]
    n_out = len(eqn.outvars[0].aval.shape)
    batch_out = [d for d in range(n_out) if d not in dn.offset_dims]
    if indices.axis >= len(eqn.invars[1].aval.shape) - 1:
        return [Lost("gather indexed along the examples")]
    return [indices.to(batch_out[indices.axis])]


@_on(*walk.KEEPS)
def _slice_like(eqn: Any, a: Axis) -> Where:
    if walk.KEEPS[eqn.primitive](eqn, a.axis):
        return a
    return Lost(f"{eqn.primitive.name} along the examples")


@_on(lax.concatenate_p)
def _concatenate(eqn: Any, a: Axis) -> Where:
    return Lost("concatenate along the examples") if eqn.params["dimension"] == a.axis else a


@_on(*walk.CUMULATIVE, *[p for p in [getattr(lax, "split_p", None)] if p is not None])
def _along(eqn: Any, a: Axis) -> Where:
    return Lost(f"{eqn.primitive.name} along the examples") if eqn.params["axis"] == a.axis else a


@_on(lax.reshape_p)
def _reshaped(eqn: Any, a: Axis) -> Where:
    return _reshape(a, eqn.invars[0].aval.shape, eqn.params["new_sizes"])


@_on(lax.transpose_p)
def _transpose(eqn: Any, a: Axis) -> Where:
    return a.to(list(eqn.params["permutation"]).index(a.axis))


@_on(lax.broadcast_in_dim_p)
def _broadcast(eqn: Any, a: Axis) -> Where:
    dims = eqn.params["broadcast_dimensions"]
    same = eqn.params["shape"][dims[a.axis]] == eqn.invars[0].aval.shape[a.axis]
    return a.to(dims[a.axis]) if same else Lost("broadcast_in_dim of the examples")


def _drop_axes(param: str) -> OneAxis:
    def rule(eqn: Any, a: Axis) -> Where:
        axes = eqn.params[param]
        if a.axis in axes:
            return Lost(f"{eqn.primitive.name} over the examples")
        return a.to(a.axis - sum(d < a.axis for d in axes))

    return rule


_on(lax.squeeze_p)(_drop_axes("dimensions"))
_on(*walk.REDUCE)(_drop_axes("axes"))
RULES.update({lax.dot_general_p: _dot, lax.gather_p: _gather})


class Examples(walk.Domain[Where]):
    """The example axis as a :class:`walk.Domain`."""

    bottom = None
    rules = RULES
    what = "examples"

    def unknown(self, eqn: Any, ins: list) -> Where:
        return Lost(eqn.primitive.name)

    def join(self, values: Sequence[Where], why: str) -> Where:
        return merge(values, why)

    def moved(self, value: Where, delta: int) -> Where:
        return value.to(value.axis + delta) if isinstance(value, Axis) else value

    def scanned(self, value: Where) -> Where:
        if not isinstance(value, Axis):
            return value
        return Lost("scan over the examples") if value.axis == 0 else value.to(value.axis - 1)

    def unstable(self, value: Where) -> Where:
        return Lost("a loop carry whose examples move")

    def conflict(self, old: tuple, new: tuple) -> tuple:
        return (Lost("a sub-computation called with different example layouts"),) * 2


def analyze(jaxpr: Any, in_annots: Sequence[Where], expanded: walk.Expanded) -> walk.Sites:
    """The values of both operands of every ``dot_general`` in ``jaxpr`` (its
    sub-jaxprs included), the arguments' example axes given by ``in_annots``."""
    walker = walk.Walker(Examples(), expanded)
    walker.run(jaxpr, in_annots)
    return walker.sites
