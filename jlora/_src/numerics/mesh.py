"""Explicit sharding (``jax.make_mesh``'s default axes): what jlora's emitted ops need.

Under ``AxisType.Explicit`` mesh axes every aval carries its sharding and JAX
refuses a contraction over sharded axes unless told the output's sharding.
These helpers read an operand's spec and choose the output spec of the rank-r
contractions the way a Megatron layout wants it: the free axes keep their
operand's sharding and the contracted ones are summed over (an all-reduce of a
rank-r product). Under Auto axes or no mesh they return None and nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from jax.typing import ArrayLike, DTypeLike


def _aval(x: Any) -> Any:
    if isinstance(x, jax.core.ShapedArray):
        return x
    aval = getattr(x, "aval", None)  # a transpose's undefined primal or a jaxpr var
    try:
        return aval if aval is not None else jax.typeof(x)
    except TypeError:
        return None


def _sharding(x: Any) -> Any:
    return getattr(_aval(x), "sharding", None)


def explicit(sharding: Any) -> bool:
    mesh = getattr(sharding, "mesh", None)
    return isinstance(sharding, NamedSharding) and AxisType.Explicit in tuple(
        getattr(mesh, "axis_types", ()) or ()
    )


def raw_spec(x: Any) -> tuple:
    """``x``'s partition spec, one entry per axis (all None when it has none)."""
    sharding = _sharding(x)
    parts = tuple(getattr(sharding, "spec", None) or ())
    return parts + (None,) * (len(_aval(x).shape) - len(parts))


def spec(x: Any) -> tuple | None:
    """``x``'s partition spec, one entry per axis, when its mesh has explicit axes."""
    return raw_spec(x) if explicit(_sharding(x)) else None


def struct(
    x: Any, shape: Sequence[int] | None = None, dtype: DTypeLike | None = None
) -> jax.ShapeDtypeStruct:
    """A ``ShapeDtypeStruct`` like ``x`` that keeps an explicit sharding (what ``fn`` is
    traced with, so sharding-aware code inside it sees the arguments' layouts)."""
    sharding = _sharding(x)
    shape = tuple(x.shape) if shape is None else shape
    dtype = x.dtype if dtype is None else dtype
    if explicit(sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(shape, dtype)


def _used(part: str | Sequence[str] | None) -> tuple:
    return () if part is None else (part,) if isinstance(part, str) else tuple(part)


def contraction_spec(ins: Sequence[str], out: str, specs: Sequence[tuple | None]) -> tuple | None:
    """The output spec of ``einsum(",".join(ins) + "->" + out)`` given the operands'
    specs (None: not explicitly sharded): each output letter takes the first operand's
    entry that shards it; a mesh axis already used by an earlier output axis is dropped
    (replicated). Contracted letters are summed over (an all-reduce)."""
    if all(sp is None for sp in specs):
        return None
    entry: dict = {}
    for ls, sp in zip(ins, specs, strict=True):
        for c, part in zip(ls, sp or (None,) * len(ls), strict=False):  # (a spec may end early)
            if entry.get(c) is None:
                entry[c] = part
    parts: list = []
    seen: set = set()
    for c in out:
        axes = _used(entry.get(c))
        parts.append(None if not axes or seen & set(axes) else entry[c])
        seen |= set(axes)
    return tuple(parts)


def einsum(subscripts: str, *ops: jax.Array) -> jax.Array:
    """``jnp.einsum`` that, under explicit axes, names its output sharding."""
    ins, out = subscripts.split("->")
    specs = [spec(x) for x in ops]
    like = next((x for x, sp in zip(ops, specs, strict=True) if sp is not None), None)
    sharding = None if like is None else named(like, contraction_spec(ins.split(","), out, specs))
    extra: dict[str, Any] = {} if sharding is None else dict(out_sharding=sharding)
    return jnp.einsum(subscripts, *ops, **extra)


def named(like: Any, parts: tuple | None) -> NamedSharding | None:
    """A ``NamedSharding`` on ``like``'s mesh with spec ``parts`` (None: no sharding)."""
    sharding = _sharding(like)
    if parts is None or not explicit(sharding):
        return None
    return NamedSharding(sharding.mesh, PartitionSpec(*parts))


def vma(x: Any) -> frozenset:
    """The manual mesh axes ``x`` varies over inside a ``shard_map`` (empty outside)."""
    aval = _aval(x)
    vma = getattr(aval, "vma", None)  # JAX < 0.10; later: the manual axis type's "varying"
    return frozenset(vma if vma is not None else getattr(getattr(aval, "mat", None), "varying", ()))


def vary(x: jax.Array, axes: Iterable[str]) -> jax.Array:
    """``x`` cast to vary over ``axes`` too (JAX inserts this cast for its own ops)."""
    axes = tuple(sorted(set(axes) - vma(x)))
    if not axes:
        return x
    pcast = getattr(jax.lax, "pcast", None)
    return pcast(x, axes, to="varying") if pcast is not None else jax.lax.pvary(x, axes)  # type: ignore[attr-defined]


def lookup(table: ArrayLike, idx: jax.Array) -> jax.Array:
    """``table[idx]`` for a small table; under an explicit mesh the result takes ``idx``'s
    sharding (each device looks up its own shard's codes)."""
    values = jnp.asarray(table)
    sharding = _sharding(idx)
    if not explicit(sharding):
        return values[idx]
    return replicated(values, sharding.mesh).at[idx].get(out_sharding=sharding)


def replicated(x: jax.Array, mesh: Any = None) -> jax.Array:
    """``x`` whole on every device of its (or ``mesh``'s) explicit axes, for a gather
    from a small table; unchanged under Auto axes or no mesh."""
    sharding = _sharding(x)
    if mesh is None and explicit(sharding):
        mesh = sharding.mesh
    if mesh is None:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))
