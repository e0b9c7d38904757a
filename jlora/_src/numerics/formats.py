"""The quantization formats: a registry, and what every format shares.

A format is one module that defines its storage node (a subclass of
:class:`~jlora._src.qnode.Quantized`) and registers a :class:`Format`: how to
quantize an array, and how to dequantize a region of a node. Everything else
(the interpreter's lazy view and rules, ``quantize``/``dequantize``, ``merge``,
``init``, checkpoints, sharding) goes through this table, so no other module
knows the formats apart.

Regions are what the interpreter narrows a weight to: a flat ``start`` (may be
traced) and a ``region`` shape ``(m,) + shape[k+1:]``, rows ``m`` of axis ``k``
at fixed indices of the axes before it (one layer of a scanned stack, a slice).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

if TYPE_CHECKING:  # (what an explicit mesh's sharding holds)
    from jax.sharding import AbstractMesh

from jlora._src.config import LoraError
from jlora._src.numerics import mesh
from jlora._src.qnode import Quantized


@dataclasses.dataclass(frozen=True)
class Format:
    #: ``quantize(w, *, path, compute_dtype, **options) -> node`` for one float array.
    quantize: Callable[..., Any]
    #: ``dequantize(node, start, region) -> array`` in ``node.compute_dtype``.
    dequantize: Callable[..., Any]
    #: The options of ``quantize`` that reproduce a node's settings (for requantizing).
    settings: Callable[[Any], dict]
    #: The options ``quantize`` accepts besides ``path`` and ``compute_dtype``.
    options: frozenset = frozenset()
    #: ``bits(rows) -> float``: stored bits per parameter of an ``(in, out)`` matrix with
    #: ``in == rows`` at the default options, scales included (``jlora._src.memory``'s table).
    bits: Callable[[float], float] = lambda rows: math.nan


FORMATS: dict[str, Format] = {}


def register(qtype: str, fmt: Format) -> None:
    FORMATS[qtype] = fmt


def of(node: Quantized) -> Format:
    return FORMATS[node.qtype]


def dequantize_region(node: Quantized, start: int | jax.Array | None, region: tuple) -> jax.Array:
    """Elements of ``region`` (see the module docstring) in the node's compute dtype."""
    return of(node).dequantize(node, start, tuple(region))


def _index(start: int | jax.Array, shape: tuple, k: int) -> list:
    """The indices of axes ``0..k`` of the flat offset ``start``."""
    strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    return [(start // strides[i]) % shape[i] for i in range(k + 1)]


def slab_region(
    node: Quantized,
    start: int | jax.Array | None,
    region: tuple,
    fields: tuple[str, ...],
    unit: int,
    decode: Callable[..., Any],
) -> jax.Array:
    """A region of a node whose ``fields`` share the weight's leading axes ``shape[:unit]``.

    ``decode(node, arrays, lead, start)`` turns ``fields`` cut to leading shape ``lead``
    (a tuple), whose first element is the weight's flat element ``start``, into values of
    shape ``lead + shape[unit:]``. A region of whole units is cut
    from the stored arrays; a smaller one is cut from its decoded unit.
    """
    shape = node.shape
    k = len(shape) - len(region)
    if region == shape and (start is None or isinstance(start, int)):
        return decode(node, {f: getattr(node, f) for f in fields}, shape[:unit], 0)
    start = 0 if start is None else start
    idx = _index(start, shape, k)

    def sliced(a: jax.Array, upto: int, size: int | None) -> jax.Array:
        """``a`` at the indices of axes ``< upto`` (dropped) and, given ``size``, rows
        ``idx[upto] ..`` of axis ``upto``."""
        n = upto + (size is not None)
        lo = list(idx[:n]) + [0] * (a.ndim - n)
        sizes = [1] * upto + ([size] if size is not None else []) + list(a.shape[n:])
        out = lax.dynamic_slice(a, lo, sizes)
        return out.reshape(out.shape[upto:])

    if k < unit:  # rows m of a leading axis: whole units
        arrays = {f: sliced(getattr(node, f), k, region[0]) for f in fields}
        return decode(node, arrays, (region[0], *shape[k + 1 : unit]), start)
    first = start - start % math.prod(shape[unit:])
    whole = decode(node, {f: sliced(getattr(node, f), unit, None) for f in fields}, (), first)
    if region == shape[unit:]:
        return whole
    lo = list(idx[unit:k]) + [idx[k]] + [0] * (len(shape) - k - 1)
    sizes = [1] * (k - unit) + list(region)
    return lax.dynamic_slice(whole, lo, sizes).reshape(region)


def _mesh_size(mesh: Mesh | AbstractMesh, part: str | Sequence[str] | None) -> int:
    parts = () if part is None else (part,) if isinstance(part, str) else tuple(part)
    return math.prod(mesh.shape[p] for p in parts)


def sharding_of(w: jax.Array) -> NamedSharding | None:
    """``w``'s ``NamedSharding`` when it splits some axis (explicit or Auto mesh)."""
    sharding = getattr(w, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec)
    return sharding if any(p is not None for p in spec) else None


def full_spec(sharding: NamedSharding, ndim: int) -> tuple:
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def lay_out(arrays: dict, sharding: NamedSharding, specs: dict) -> dict:
    """``arrays`` placed on ``sharding``'s mesh, each by its spec in ``specs`` (an entry
    whose axis the mesh axes do not divide is replicated); the others replicated."""
    mesh = sharding.mesh
    out: dict = {}
    for name, a in arrays.items():
        if a is None:
            out[name] = None
            continue
        spec = specs.get(name, (None,) * a.ndim)
        spec = tuple(
            p if p is not None and a.shape[i] % _mesh_size(mesh, p) == 0 else None
            for i, p in enumerate(spec)
        )
        out[name] = jax.device_put(a, NamedSharding(mesh, PartitionSpec(*spec)))
    return out


def replicated(w: Any) -> jax.Array:  # (an array with a NamedSharding)
    """``w`` whole on every device of its mesh (to quantize it in one piece)."""
    whole = NamedSharding(w.sharding.mesh, PartitionSpec())
    if mesh.explicit(w.sharding):
        return jax.sharding.reshard(w, whole)
    return jax.device_put(w, whole)


def divides(
    mesh: Mesh | AbstractMesh, part: str | Sequence[str] | None, n: int, block: int
) -> bool:
    """Whether splitting an axis of ``n`` elements by ``part`` keeps whole ``block``s."""
    k = _mesh_size(mesh, part)
    return n % k == 0 and (n // k) % block == 0


def check_finite(w: jax.Array, path: str) -> None:
    """Refuse a weight with inf or nan (its scales would be non-finite)."""
    try:
        bad = not bool(jnp.isfinite(w).all())
    except jax.errors.ConcretizationTypeError:
        return  # traced: nothing to check here
    if bad:
        raise LoraError(
            f"cannot quantize {path!r}: it holds inf or nan, so its scales "
            "would not be finite; fix the weight or leave it out of targets"
        )
