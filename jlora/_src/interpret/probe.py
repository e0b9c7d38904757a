"""Probe mode: learn each target's stacked, in and out axes from how ``fn`` uses it.

The weight is carried as a :class:`~jlora._src.interpret.sym.Sym` with no factors
whose labels are its original axes; the rules record what the model does with
it (``("dot", contracted, batched)`` from the ``dot_general`` rule, ``("index",
axis)`` when an axis is indexed away or scanned over, ``("gather", axes)`` for a row
lookup, ``("pick", axis)`` for whole slices gathered along one axis of a 3+-D weight:
layers if the result is contracted, else a table's rows) and compute the base alone.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from jlora._src.config import LoraError
from jlora._src.interpret.concat import by_path
from jlora._src.interpret.core import Ctx, evaluate
from jlora._src.interpret.sym import Probe
from jlora._src.interpret.trace import trace
from jlora._src.numerics import qview as qv
from jlora._src.targets import Params, flatten, path_str


def _records(
    fn: Callable, params: Params, paths: set[str], args: tuple, kwargs: dict
) -> tuple[dict, dict]:
    """The use records of each path in ``paths``, and each leaf's rank."""
    ctx = Ctx()
    closed, _, dyn = trace(fn, params, args, kwargs)
    vals, ndims = [], {}
    for kp, leaf in flatten(params)[0]:
        p, leaf = path_str(kp), qv.wrap(leaf)
        ndims[p] = leaf.ndim
        vals.append(Probe.of(leaf, p) if p in paths else leaf)
    jax.eval_shape(lambda v: evaluate(closed.jaxpr, closed.consts, v, ctx), vals + dyn[len(vals) :])
    return ctx.records, ndims


def discover_axes(
    fn: Callable, params: Params, paths: set[str], args: tuple, kwargs: dict
) -> dict[str, tuple]:
    """Learn ``(stack_axes, in_axes, out_axes)`` per path from how ``fn`` contracts it.

    Contracted axes are "in", axes indexed, scanned over or batched in the
    contraction are "stacked", the rest "out"; a table looked up by rows
    (an embedding) has the looked-up axis "in", as PEFT's ``Embedding`` LoRA,
    whatever else (a tied ``x @ E.T``) contracts it. Paths ``fn`` never
    contracts or looks up are left out (the caller falls back to the default
    convention).
    """
    records, ndims = _records(fn, params, paths, args, kwargs)
    records = by_path(records, paths)
    found = {}
    for path in paths:
        events = _flat([e for e in records[path] if isinstance(e, tuple)])
        dots = [e for e in events if e[0] == "dot"]
        lookups = [e for e in events if e[0] == "gather"]
        picks = {e[1] for e in events if e[0] == "pick"}
        if not dots and not lookups and not picks:
            continue
        stack = {e[1] for e in events if e[0] == "index"}
        if lookups:
            ins = tuple(sorted(lookups[0][1]))
        elif dots:  # whole slices picked, then contracted: layers of a stack
            stack |= set(dots[0][2]) | picks
            ins = tuple(sorted(dots[0][1]))
        else:  # whole slices picked and never contracted: rows of a 3+-D table
            ins = tuple(sorted(picks))
        _check_disjoint(path, stack, ins, events)
        _check_whole(path, dots)
        outs = tuple(ax for ax in range(ndims[path]) if ax not in stack and ax not in ins)
        if ins and outs:
            found[path] = (tuple(sorted(stack)), ins, outs)
    return found


def _axes(x: int | tuple) -> tuple[int, ...]:
    """Original axes from recorded labels: ints, or tuples of them (merged by a reshape),
    each once (the parts of an axis split by a reshape all hold that one axis)."""
    items = x if isinstance(x, tuple) else (x,)
    found = (a for v in items for a in (_axes(v) if isinstance(v, tuple) else (v,)))
    return tuple(dict.fromkeys(found))


def _flat(events: list) -> list:
    """Events with each recorded axis an original axis (a merged axis's all of them)."""
    out: list = []
    for e in events:
        if e[0] == "dot":  # (contracted, batched[, kept]): conv and ragged keep no axes
            out.append(("dot", *map(_axes, e[1:])))
        elif e[0] == "gather":
            out.append(("gather", _axes(e[1])))
        else:  # "index", "pick": one event per original axis
            out += [(e[0], ax) for ax in _axes(e[1])]
    return out


def _check_whole(path: str, dots: list) -> None:
    """Raise if a dot contracts part of a weight axis (split by a reshape) and keeps the
    rest: a LoRA factor contracts whole axes of the weight."""
    for e in dots:
        part = sorted(set(e[1]) & set(e[3] if len(e) > 3 else ()))
        if part:
            raise LoraError(
                f"{path!r}: fn splits axis {part[0]} of the weight with a reshape, then "
                "contracts one part and keeps the other, so that axis is neither wholly in "
                "nor wholly out; LoRA's factors map whole axes: adapt this weight as fn sees "
                "it (reshape it in params) or leave it out of targets"
            )


_USES = {
    "dot": "contracted by a dot_general",
    "gather": "looked up by a gather",
    "index": "indexed, sliced away or scanned over",
    "pick": "picked whole slices of",
}


def _check_disjoint(path: str, stack: set, ins: tuple, events: list) -> None:
    """Raise if one axis would be both stacked and "in": two uses disagree about it."""
    both = sorted(stack & set(ins))
    if not both:
        return
    ax = both[0]
    uses = [
        _USES[e[0]]
        for e in events
        if ax in (e[1] if isinstance(e[1], tuple) else (e[1],)) or (e[0] == "dot" and ax in e[2])
    ]
    raise LoraError(
        f"{path!r}: fn uses axis {ax} of the weight in two ways that give it different roles "
        f"({' and '.join(dict.fromkeys(uses))}), so jlora cannot learn which axes are "
        "stacked, in and out; choose them yourself: jlora.init without fn (Flax's convention: "
        "last axis out, second-to-last in, leading axes stacked), and the other use "
        "materializes the weight (jlora.explain says which)"
    )
