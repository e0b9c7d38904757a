"""``shard_map`` bodies that read an adapted weight, computed factored per device.

The weight goes into the body as its parts: the base block and the factors, each
with the in-spec its role implies (``a`` takes the weight's spec on its in-axes,
``b`` and DoRA's ``g`` on its out-axes, the rank axis unsplit), so a device
holds ``x_blk W0_blk + s (x_blk A_blk) B_blk``. That is linear in each block, so
the body's own collectives (a ``psum`` after a row-parallel product) give the
right total. ``pvary`` (JAX's varying-axes cast) applies to every part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax import lax
from jax.extend.core import JaxprEqn
from jax.sharding import PartitionSpec

from jlora._src.interpret import sym as sy
from jlora._src.interpret.core import Ctx, evaluate, materialize_rule, materialized, register
from jlora._src.interpret.walk import primitives
from jlora._src.numerics import qview as qv

_FIELDS = ("base", "a", "b", "g")


def _part_specs(sym: sy.Sym, spec: tuple) -> list:
    """The in-specs of ``sym``'s base, ``a``, ``b``, ``g``, given the weight's."""
    spec = tuple(spec) + (None,) * (sym.base.ndim - len(spec))
    ns = sym.count("s")
    place = {
        "a": lambda k, j: j if k == "s" else ns + j if k == "i" else None,
        "b": lambda k, j: j if k == "s" else ns + 1 + j if k == "o" else None,
        "g": lambda k, j: j if k == "s" else ns + j if k == "o" else None,
    }
    out: list = [PartitionSpec(*spec)]
    for name in _FIELDS[1:]:
        part = getattr(sym, name)
        if part is None:
            out.append(None)
            continue
        entries = [None] * part.ndim
        for ax, (k, j) in enumerate(sym.labels):
            at = place[name](k, j)
            if at is not None:
                entries[at] = spec[ax]
        out.append(PartitionSpec(*entries))
    return out


def _split(v: Any, spec: Any) -> tuple[list, list, Callable[[list], Any]]:
    """(parts, specs, rebuild) for one input of the shard_map."""
    if qv.is_view(v):
        v = v.value()
    if not isinstance(v, sy.Sym):
        return [v], [spec], lambda parts: parts[0]
    if qv.is_view(v.base):
        v = v.replace(base=v.base.value())
    specs = _part_specs(v, spec)
    keep = [i for i, f in enumerate(_FIELDS) if getattr(v, f) is not None]
    return (
        [getattr(v, _FIELDS[i]) for i in keep],
        [specs[i] for i in keep],
        lambda parts: v.replace(**dict(zip((_FIELDS[i] for i in keep), parts, strict=True))),
    )


@register(names=("shard_map",))
def _shard_map(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    p = eqn.params
    manual = p.get("newly_manual_axes", p.get("manual_axes"))
    if manual is None:  # a shard_map whose manual axes this JAX does not name: bound whole
        return materialize_rule(eqn, invals, ctx)
    if any(isinstance(v, sy.Sym) and v.ids is not None for v in invals):
        invals = materialized(invals, ctx, "shard_map with a mixed-adapter batch")
    splits = [_split(v, s) for v, s in zip(invals, p["in_specs"], strict=True)]
    flat = [x for parts, _, _ in splits for x in parts]
    specs = tuple(s for _, ss, _ in splits for s in ss)
    sizes = [len(parts) for parts, _, _ in splits]
    axes = tuple(sorted(manual))

    def body(key: jax.Array | None, *flat: Any) -> tuple:
        vals, at = [], 0
        for (_, _, rebuild), n in zip(splits, sizes, strict=True):
            vals.append(rebuild(list(flat[at : at + n])))
            at += n
        if key is not None:  # a different dropout mask on every device
            key = jax.random.fold_in(key, lax.axis_index(axes))
        sub = dataclasses.replace(ctx, key=key)
        return tuple(materialized(evaluate(p["jaxpr"], (), vals, sub), ctx, "shard_map output"))

    mapped = jax.shard_map(
        body,
        mesh=p["mesh"],
        in_specs=(PartitionSpec(), *specs),
        out_specs=p["out_specs"],
        axis_names=frozenset(manual),
        check_vma=p.get("check_vma", True),
    )
    return list(mapped(ctx.key, *flat))


def _constrained(v: sy.Sym, eqn: JaxprEqn, key: str) -> sy.Sym | None:
    """``v`` with the eqn's constraint on its base and the matching one on each factor."""
    target = eqn.params[key]
    if not isinstance(target, jax.sharding.NamedSharding):
        return None
    parts = dict(zip(_FIELDS, _part_specs(v, tuple(target.spec)), strict=True))

    def bind(x: jax.Array, spec: PartitionSpec) -> jax.Array:
        return eqn.primitive.bind(
            x, **{**eqn.params, key: jax.sharding.NamedSharding(target.mesh, spec)}
        )

    base = sy.on_base(v.base, eqn.primitive, **eqn.params)
    return v.replace(
        base=base,
        **{f: bind(getattr(v, f), parts[f]) for f in _FIELDS[1:] if getattr(v, f) is not None},
    )


_RESHARD = primitives("sharding_constraint_p", "reshard_p")


@register(*_RESHARD, names=("sharding_constraint", "reshard"), on=sy.Probe)
def _probe_reshard(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """A probed weight constrained or resharded: its base, the layout kept."""
    v = invals[0]
    if not isinstance(v, sy.Probe):
        return _reshard(eqn, invals, ctx)
    return v.replace(base=sy.on_base(v.base, eqn.primitive, **eqn.params))


@register(*_RESHARD, names=("sharding_constraint", "reshard"))
def _reshard(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """An adapted weight constrained or resharded: each part to its own spec."""
    (v,) = invals[:1]
    key = "sharding" if eqn.primitive.name == "sharding_constraint" else "dst_sharding"
    out = None
    if (
        isinstance(v, sy.Sym)
        and v.ids is None
        and len(invals) == 1
        and (eqn.primitive.name == "reshard" or not eqn.params.get("unconstrained_dims"))
    ):
        out = _constrained(v, eqn, key)
    if out is None:
        return materialize_rule(eqn, invals, ctx)
    return out


@register(names=("pvary",))
def _pvary(eqn: JaxprEqn, invals: list, ctx: Ctx) -> Any:
    """Each part of an adapted weight cast to vary over the axes it does not yet."""
    (v,) = invals
    if qv.is_view(v):
        v = v.value()

    def cast(x: jax.Array) -> jax.Array:
        have: frozenset = getattr(jax.typeof(x), "vma", frozenset())
        axes = tuple(a for a in eqn.params["axes"] if a not in have)
        return x if not axes else eqn.primitive.bind(x, **{**eqn.params, "axes": axes})

    if not isinstance(v, sy.Sym):
        return cast(v)
    return v.replace(**{f: cast(getattr(v, f)) for f in _FIELDS if getattr(v, f) is not None})
