"""Which token each row is: a dataflow pass over the jaxpr for ``apply(..., lora_mask=)``.

A per-token mask (``(batch, seq)`` for activated LoRA) gates the low-rank path of
every adapted use row by row, so the interpreter must know, for each row of an
adapted weight's input, which entry of the mask it belongs to. Each axis of the mask
is a *component*; this pass follows every component from the arguments through
every equation, as :mod:`jlora.interpret.example_axis` follows the example axis.

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

import jax
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jlora.config import LoraError
from jlora.interpret import example_axis as ea
from jlora.interpret.control import hi_jaxpr
from jlora.interpret.sym import reshape_groups
from jlora.interpret.trace import is_array


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


def _lost(ats, why: str) -> frozenset:
    return frozenset(At(c, None, None, None, why) for c in {a.comp for a in ats})


def _blurred(a: At, why: str) -> At:
    return At(a.comp, a.axis, None, None, why) if a.axis is not None else a


def _map(ats, fn) -> frozenset:
    """Each exact placement through ``fn(at) -> At | None (dropped)``; lost ones kept."""
    out = set()
    for a in ats:
        b = fn(a) if a.axis is not None else a
        if b is not None:
            out.add(b)
    return frozenset(out)


def _reshape(a: At, old, new) -> At:
    """A placement through a reshape: the coordinate as a function of the merged group's
    flat index ``f`` is ``(f // p) % q``; find the new axis that carries that."""
    groups = reshape_groups(tuple(old), tuple(new))
    if groups is None or a.inner is None:
        return _blurred(a, "reshape")
    gi, gj = next((gi, gj) for gi, gj in groups if a.axis in gi)
    k = gi.index(a.axis)
    if old[a.axis] % a.inner:
        return _blurred(a, "reshape")
    q = old[a.axis] // a.inner if a.outer is None else a.outer
    if a.outer is not None and q and (old[a.axis] // a.inner) % q:
        return _blurred(a, "reshape")
    lead = all(old[g] == 1 for g in gi[:k])
    p, q = (
        a.inner * math.prod(old[g] for g in gi[k + 1 :]),
        (None if lead and a.outer is None else q),
    )
    for n, j in enumerate(gj):
        after = math.prod(new[h] for h in gj[n + 1 :])
        if p % after == 0:
            inner = p // after
            first = all(new[h] == 1 for h in gj[:n])
            if first or (q is not None and new[j] % (inner * q) == 0):
                return At(a.comp, j, inner, q)
    return _blurred(a, "reshape that splits the tokens over two axes")


#: ``rule(eqn, ins) -> [annotation per output]``, run when some input carries a component.
RULES: dict = {}


def _elementwise(eqn, ins):
    return [frozenset().union(*ins)] * len(eqn.outvars)


def _keeps(eqn, ins):
    """Slice-like ops: the operand's placements, blurred along an axis not kept whole."""
    keep = ea._KEEPS[eqn.primitive]
    first = _map(ins[0], lambda a: a if keep(eqn, a.axis) else _blurred(a, eqn.primitive.name))
    if eqn.primitive is lax.dynamic_update_slice_p:
        first |= _map(ins[1], lambda a: a if keep(eqn, a.axis) else _blurred(a, eqn.primitive.name))
    return [first]  # start indices are scalars: they have no rows to place


def _along(param: str, drop: bool):
    """Ops along one axis: a placement there is dropped (reductions) or blurred."""

    def rule(eqn, ins):
        axis = eqn.params[param]
        f = (
            (lambda a: None if a.axis == axis else a)
            if drop
            else (lambda a: _blurred(a, eqn.primitive.name) if a.axis == axis else a)
        )
        return [_map(frozenset().union(*ins), f)] * len(eqn.outvars)

    return rule


def _reduce(eqn, ins):
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


def _squeeze(eqn, ins):
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


def _broadcast(eqn, ins):
    dims, shape, old = (
        eqn.params["broadcast_dimensions"],
        eqn.params["shape"],
        eqn.invars[0].aval.shape,
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


def _dot(eqn, ins):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    nl, nr = (len(v.aval.shape) for v in eqn.invars)
    lfree = [ax for ax in range(nl) if ax not in lc and ax not in lb]
    rfree = [ax for ax in range(nr) if ax not in rc and ax not in rb]
    out: frozenset = NONE
    for ats, contracted, batch, free, shift in (
        (ins[0], lc, lb, lfree, len(lb)),
        (ins[1], rc, rb, rfree, len(lb) + len(lfree)),
    ):
        out |= _map(
            ats,
            lambda a: (
                None
                if a.axis in contracted
                else dataclasses.replace(
                    a,
                    axis=list(batch).index(a.axis)
                    if a.axis in batch
                    else shift + free.index(a.axis),
                )
            ),
        )
    return [out]


def _gather(eqn, ins):
    """An embedding lookup: rows follow the indices' placements."""
    operand, indices = ins
    dn = eqn.params["dimension_numbers"]
    n_out = len(eqn.outvars[0].aval.shape)
    batch_out = [d for d in range(n_out) if d not in dn.offset_dims]
    last = len(eqn.invars[1].aval.shape) - 1
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


def _concat(eqn, ins):
    dim = eqn.params["dimension"]
    return [
        _map(frozenset().union(*ins), lambda a: _blurred(a, "concatenate") if a.axis == dim else a)
    ]


def _transpose(eqn, ins):
    perm = list(eqn.params["permutation"])
    return [_map(ins[0], lambda a: dataclasses.replace(a, axis=perm.index(a.axis)))]


RULES.update(dict.fromkeys(ea._ELEMENTWISE, _elementwise))
RULES.update(dict.fromkeys(ea._KEEPS, _keeps))
RULES.update(dict.fromkeys(ea._CUMULATIVE, _along("axis", drop=False)))
RULES.update(dict.fromkeys(ea._REDUCE, _reduce))
RULES.update(
    {
        lax.reshape_p: lambda eqn, ins: [
            _map(ins[0], lambda a: _reshape(a, eqn.invars[0].aval.shape, eqn.params["new_sizes"]))
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


def _eqn(eqn, ins, sites: dict) -> list:
    prim = eqn.primitive
    walk = WALKS.get(prim) or (_hi if prim.name == "call_hi_primitive" else None)
    if walk is not None:
        return walk(eqn, ins, sites)
    if not any(ins):
        return [NONE] * len(eqn.outvars)
    rule = RULES.get(prim)
    if rule is None:
        return [_lost(frozenset().union(*ins), prim.name)] * len(eqn.outvars)
    return rule(eqn, ins)


def _dot_walk(eqn, ins, sites):
    key = id(eqn)
    if key in sites and sites[key][1] != tuple(ins):  # a sub-jaxpr met twice, differently
        ins = [
            _lost(
                ins[0] | sites[key][1][0], "a sub-computation called with different token layouts"
            )
        ] * 2
    sites[key] = (eqn, tuple(ins))
    return _dot(eqn, ins)


def _call(eqn, ins, sites):
    sub = eqn.params[ea._CALLS[eqn.primitive]]
    return analyze(getattr(sub, "jaxpr", sub), ins, sites)


def _hi(eqn, ins, sites):
    return analyze(hi_jaxpr(eqn).jaxpr, ins, sites)


def _cond(eqn, ins, sites):
    outs = [analyze(b.jaxpr, ins[1:], sites) for b in eqn.params["branches"]]
    return [frozenset().union(*o) for o in zip(*outs)]  # the branch index is a scalar


def _fixed_point(body, carry, sites):
    """Loop carries: the union of what enters and what each pass returns, until stable;
    only the last pass (with the stable carries) records its dots."""
    for _ in range(4):
        outs = body(carry, {})
        new = [c | o for c, o in zip(carry, outs[: len(carry)])]
        if new == carry:
            break
        carry = new
    else:
        carry = [_lost(c, "a loop carry whose tokens move") for c in carry]
    return carry, body(carry, sites)


def _scan(eqn, ins, sites):
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    xs = [
        _map(
            a,
            lambda at: (
                At(at.comp, None, None, None, "scan over the tokens")
                if at.axis == 0
                else dataclasses.replace(at, axis=at.axis - 1)
            ),
        )
        for a in ins[nc + ncarry :]
    ]
    body = lambda carry, rec: analyze(p["jaxpr"].jaxpr, list(ins[:nc]) + carry + xs, rec)
    carry, outs = _fixed_point(body, list(ins[nc : nc + ncarry]), sites)
    return carry + [
        _map(a, lambda at: dataclasses.replace(at, axis=at.axis + 1)) for a in outs[ncarry:]
    ]


def _while(eqn, ins, sites):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    body = lambda carry, rec: analyze(p["body_jaxpr"].jaxpr, list(ins[nc : nc + nb]) + carry, rec)
    return _fixed_point(body, list(ins[nc + nb :]), sites)[0]


def analyze(jaxpr, in_annots, sites: dict | None = None) -> list:
    """Annotations of ``jaxpr``'s outputs; records each ``dot_general``'s operands in
    ``sites`` (``{id(eqn): (eqn, (lhs, rhs))}``)."""
    sites = {} if sites is None else sites
    env = dict(zip(jaxpr.invars, in_annots))
    read = lambda v: NONE if isinstance(v, jcore.Literal) else env.get(v, NONE)
    for eqn in jaxpr.eqns:
        env.update(zip(eqn.outvars, _eqn(eqn, [read(v) for v in eqn.invars], sites)))
    return [read(v) for v in jaxpr.outvars]


WALKS: dict = {
    lax.dot_general_p: _dot_walk,
    lax.scan_p: _scan,
    lax.while_p: _while,
    lax.cond_p: _cond,
    **dict.fromkeys(ea._CALLS, _call),
}


def layout(args, kwargs, mask_shape) -> list:
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
