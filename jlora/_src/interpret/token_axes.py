"""Which token each row is: a dataflow domain for ``apply(..., lora_mask=)``.

A per-token mask (``(batch, seq)`` for activated LoRA) gates the low-rank path of
every adapted use row by row, so the interpreter must know, for each row of an
adapted weight's input, which entry of the mask it belongs to. Each axis of the mask
is a *component*; this pass follows every component from the arguments through
every equation, as :mod:`jlora._src.interpret.example_axis` follows the example axis, run by
the same walker (:mod:`jlora._src.interpret.walk`).

A value's annotation is a frozenset of :class:`At`: component ``c`` lies along axis
``axis`` with index ``i`` at coordinate ``(i // inner) % outer`` (``outer`` None: no
wrap). Unlike examples, tokens are meant to meet: attention contracts the key
positions, and the row that comes out is its query's. So a contraction or reduction
over a component's axis drops that placement (the row keeps whatever others it has),
while an op that shifts or reorders along it (a slice, a cache write, a cumsum) keeps
the axis but forgets the mapping (``inner`` None), and an op this pass has no rule for
loses the component altogether (``axis`` None). A scalar (a cache index, a branch
index) has no rows, so what it was computed from does not matter: placements are
about which token a row is, not which tokens it read. At an adapted use, each component
must sit exactly once, with its mapping, on a free axis of the input; anything else
is refused there (:func:`gate`), never guessed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.extend.core import JaxprEqn

from jlora._src.config import LoraError
from jlora._src.interpret import walk
from jlora._src.interpret.sym import reshape_groups
from jlora._src.interpret.trace import is_array


@dataclasses.dataclass(frozen=True)
class At:
    """Component ``comp`` of the mask along ``axis`` (None: lost), index ``i`` at
    coordinate ``(i // inner) % outer`` (``inner`` None: the mapping was lost)."""

    comp: int
    axis: int | None
    inner: int | None = 1
    outer: int | None = None
    why: str = dataclasses.field(default="", compare=False)


NONE: frozenset = frozenset()


def _lost(ats: Iterable[At], why: str) -> frozenset:
    return frozenset(At(c, None, None, None, why) for c in {a.comp for a in ats})


def _blurred(a: At, why: str) -> At:
    return At(a.comp, a.axis, None, None, why) if a.axis is not None else a


def _map(ats: frozenset, fn: Callable) -> frozenset:
    """Each exact placement through ``fn(at) -> At | None (dropped)``; lost ones kept."""
    out = set()
    for a in ats:
        b = fn(a) if a.axis is not None else a
        if b is not None:
            out.add(b)
    return frozenset(out)


def _reshape(a: At, old: Sequence[int], new: Sequence[int]) -> At:
    """A placement through a reshape: the coordinate as a function of the merged group's
    flat index ``f`` is ``(f // p) % q``; find the new axis that carries that."""
    groups = reshape_groups(tuple(old), tuple(new))
    if groups is None or a.inner is None or a.axis is None:
        return _blurred(a, "reshape")
    gi, gj = next((gi, gj) for gi, gj in groups if a.axis in gi)
    k = gi.index(a.axis)
    if old[a.axis] % a.inner:
        return _blurred(a, "reshape")
    q = old[a.axis] // a.inner if a.outer is None else a.outer
    if a.outer is not None and q and (old[a.axis] // a.inner) % q:
        return _blurred(a, "reshape")
    lead = all(old[g] == 1 for g in gi[:k])
    p = a.inner * math.prod(old[g] for g in gi[k + 1 :])
    outer = None if lead and a.outer is None else q
    for n, j in enumerate(gj):
        after = math.prod(new[h] for h in gj[n + 1 :])
        if p % after == 0:
            inner = p // after
            first = all(new[h] == 1 for h in gj[:n])
            if first or (outer is not None and new[j] % (inner * outer) == 0):
                return At(a.comp, j, inner, outer)
    return _blurred(a, "reshape that splits the tokens over two axes")


#: ``rule(eqn, ins) -> [annotation per output]``, run when some input carries a component.
RULES: dict = {}


def _elementwise(eqn: JaxprEqn, ins: list) -> list:
    return [frozenset().union(*ins)] * len(eqn.outvars)


#: Slice-like ops whose leading operands are all arrays with rows (the rest are scalars:
#: start indices, a padding value): a cache write's update has rows too.
_ARRAYS = {lax.dynamic_update_slice_p: 2}


def _keeps(eqn: Any, ins: list) -> list:
    """Slice-like ops: the array operands' placements, blurred along an axis not kept
    whole (start indices are scalars: they have no rows to place)."""
    keep = walk.KEEPS[eqn.primitive]

    def kept(a: At) -> At:
        assert a.axis is not None  # (_map passes placed ones only)
        return a if keep(eqn, a.axis) else _blurred(a, eqn.primitive.name)

    return [frozenset().union(*(_map(x, kept) for x in ins[: _ARRAYS.get(eqn.primitive, 1)]))]


def _along(param: str, drop: bool) -> Callable[[JaxprEqn, list], list]:
    """Ops along one axis: a placement there is dropped (reductions) or blurred."""

    def rule(eqn: JaxprEqn, ins: list) -> list:
        axis = eqn.params[param]
        f = (
            (lambda a: None if a.axis == axis else a)
            if drop
            else (lambda a: _blurred(a, eqn.primitive.name) if a.axis == axis else a)
        )
        return [_map(frozenset().union(*ins), f)] * len(eqn.outvars)

    return rule


def _reduce(eqn: JaxprEqn, ins: list) -> list:
    axes = eqn.params["axes"]
    return [
        _map(
            ins[0],
            lambda a: (
                None
                if a.axis in axes
                else dataclasses.replace(a, axis=a.axis - sum(d < a.axis for d in axes))
            ),
        )
    ]


def _squeeze(eqn: JaxprEqn, ins: list) -> list:
    dims = eqn.params["dimensions"]
    return [
        _map(
            ins[0],
            lambda a: (
                None
                if a.axis in dims  # size 1: no rows left to tell
                else dataclasses.replace(a, axis=a.axis - sum(d < a.axis for d in dims))
            ),
        )
    ]


def _broadcast(eqn: JaxprEqn, ins: list) -> list:
    dims, shape, old = (
        eqn.params["broadcast_dimensions"],
        eqn.params["shape"],
        walk.aval_shape(eqn.invars[0]),
    )
    return [
        _map(
            ins[0],
            lambda a: (
                dataclasses.replace(a, axis=dims[a.axis])
                if shape[dims[a.axis]] == old[a.axis]
                else _blurred(a, "broadcast")
            ),
        )
    ]


def _dot(eqn: Any, ins: list) -> list:
    out: frozenset = NONE
    for side, ats in enumerate(ins):

        def to(a: At, side: int = side) -> At | None:
            assert a.axis is not None  # (_map passes placed ones only)
            axis = walk.dot_axis(eqn, side, a.axis)  # None: contracted, the placement goes
            return None if axis is None else dataclasses.replace(a, axis=axis)

        out |= _map(ats, to)
    return [out]


def _gather(eqn: Any, ins: list) -> list:
    """An embedding lookup: rows follow the indices' placements."""
    operand, indices = ins
    dn = eqn.params["dimension_numbers"]
    n_out = len(walk.aval_shape(eqn.outvars[0]))
    batch_out = [d for d in range(n_out) if d not in dn.offset_dims]
    last = len(walk.aval_shape(eqn.invars[1])) - 1
    if operand or getattr(dn, "operand_batching_dims", ()):
        return [_lost(operand | indices, "gather from an array that carries the tokens")]
    return [
        _map(
            indices,
            lambda a: (
                At(a.comp, None, None, None, "gather along the index")
                if a.axis >= last
                else dataclasses.replace(a, axis=batch_out[a.axis])
            ),
        )
    ]


def _concat(eqn: JaxprEqn, ins: list) -> list:
    dim = eqn.params["dimension"]
    return [
        _map(frozenset().union(*ins), lambda a: _blurred(a, "concatenate") if a.axis == dim else a)
    ]


def _transpose(eqn: JaxprEqn, ins: list) -> list:
    perm = list(eqn.params["permutation"])
    return [_map(ins[0], lambda a: dataclasses.replace(a, axis=perm.index(a.axis)))]


RULES.update(dict.fromkeys(walk.ELEMENTWISE, _elementwise))
RULES.update(dict.fromkeys(walk.KEEPS, _keeps))
RULES.update(dict.fromkeys(walk.CUMULATIVE, _along("axis", drop=False)))
RULES.update(dict.fromkeys(walk.REDUCE, _reduce))
RULES.update(
    {
        lax.reshape_p: lambda eqn, ins: [
            _map(
                ins[0],
                lambda a: _reshape(a, walk.aval_shape(eqn.invars[0]), eqn.params["new_sizes"]),
            )
        ],
        lax.transpose_p: _transpose,
        lax.broadcast_in_dim_p: _broadcast,
        lax.squeeze_p: _squeeze,
        lax.dot_general_p: _dot,
        lax.gather_p: _gather,
        lax.concatenate_p: _concat,
    }
)
if hasattr(lax, "split_p"):
    RULES[lax.split_p] = _along("axis", drop=False)


class Tokens(walk.Domain[frozenset]):
    """The mask's token axes as a :class:`walk.Domain`: a frozenset of :class:`At`."""

    bottom = NONE
    rules = RULES
    what = "tokens"

    def unknown(self, eqn: Any, ins: list) -> frozenset:
        return _lost(frozenset().union(*ins), eqn.primitive.name)

    def join(self, values: Sequence[frozenset], why: str) -> frozenset:
        return frozenset().union(*values)  # a branch index or loop counter has no rows

    def moved(self, value: frozenset, delta: int) -> frozenset:
        def shifted(a: At) -> At:
            assert a.axis is not None  # (_map passes placed ones only)
            return dataclasses.replace(a, axis=a.axis + delta)

        return _map(value, shifted)

    def scanned(self, value: frozenset) -> frozenset:
        def inside(a: At) -> At:
            assert a.axis is not None  # (_map passes placed ones only)
            if a.axis == 0:
                return At(a.comp, None, None, None, "scan over the tokens")
            return dataclasses.replace(a, axis=a.axis - 1)

        return _map(value, inside)

    def unstable(self, value: frozenset) -> frozenset:
        return _lost(value, "a loop carry whose tokens move")

    def conflict(self, old: tuple, new: tuple) -> tuple:
        lost = _lost(new[0] | old[0], "a sub-computation called with different token layouts")
        return (lost, lost)


def analyze(jaxpr: Any, in_annots: Sequence[frozenset], expanded: walk.Expanded) -> walk.Sites:
    """The placements of both operands of every ``dot_general`` in ``jaxpr`` (its
    sub-jaxprs included), the arguments' given by ``in_annots``."""
    walker = walk.Walker(Tokens(), expanded)
    walker.run(jaxpr, in_annots)
    return walker.sites


def layout(args: tuple, kwargs: dict, mask_shape: tuple[int, ...]) -> list:
    """Argument annotations (in the traced jaxpr's order): an array whose leading axes
    have the mask's shape carries component ``c`` along axis ``c``; any other argument
    is the same for every token."""
    k = len(mask_shape)
    leaves = [
        x
        for tree in (args, [kwargs[n] for n in sorted(kwargs)])
        for x in jax.tree.leaves(tree)
        if is_array(x)
    ]
    out = [
        frozenset(At(c, c) for c in range(k))
        if tuple(np.shape(x)[:k]) == tuple(mask_shape)
        else NONE
        for x in leaves
    ]
    sizes = [n for n in mask_shape if n > 1]
    if len(set(sizes)) < len(sizes) and any(out):  # (n, n): a seq-major input fits too
        raise LoraError(
            f"lora_mask of shape {tuple(mask_shape)} has two axes of the same "
            "size, so an argument leading with that shape could hold them in "
            "either order, and jlora would gate the wrong rows; pad one axis "
            "(e.g. the sequence) so that the sizes differ"
        )
    return out
