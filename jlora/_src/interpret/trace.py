"""``fn`` as a jaxpr over its array arguments: what the interpreter evaluates.

Traced jaxprs are kept (least recently used, :data:`CACHE_SIZE`) per ``fn``, argument
structure, static leaves, array shapes, dtypes and shardings, and the JAX settings
that change tracing, so a second eager call of ``jlora.apply(fn)`` on the same shapes
does not trace ``fn`` again. As under ``jax.jit``, values ``fn`` closes over are read
when it is first traced. A jaxpr that captured a tracer of an enclosing transformation
is not kept.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr
from jax.tree_util import PyTreeDef

from jlora._src.numerics import mesh
from jlora._src.numerics import qview as qv
from jlora._src.qnode import Quantized, is_quantized
from jlora._src.targets import Params, flatten, path_str


def is_array(x: jax.Array) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or is_quantized(x)


def _spec(x: jax.Array | Quantized) -> jax.ShapeDtypeStruct:
    """What ``fn`` is traced with: a quantized leaf looks like its dequantized weight; an
    explicitly sharded array keeps its sharding."""
    if is_quantized(x):
        return qv.QView.of(x).aval
    return mesh.struct(x, np.shape(x), jnp.result_type(x))


CACHE_SIZE = 16
_CACHE: collections.OrderedDict = collections.OrderedDict()


def _key(fn: Callable, tree: PyTreeDef, flat: list, dyn: list[int], specs: list) -> tuple | None:
    """The cache key, or None when something in it cannot be hashed."""
    dynset = set(dyn)
    static = tuple(x for i, x in enumerate(flat) if i not in dynset)
    mesh_ctx = getattr(jax.sharding, "get_abstract_mesh", lambda: None)()
    config: Any = jax.config  # (its flags are attributes mypy cannot see)
    settings = (
        config.jax_enable_x64,
        config.jax_numpy_rank_promotion,
        str(config.jax_default_matmul_precision),
        mesh_ctx,
    )
    key = (fn, tree, static, tuple(specs), settings)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _traced(
    fn: Callable, tree: PyTreeDef, flat: list, dyn: list[int], specs: list
) -> tuple[ClosedJaxpr, PyTreeDef]:
    key = _key(fn, tree, flat, dyn, specs)
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]

    def flat_fn(*vals: Any) -> Any:
        full = list(flat)
        for i, v in zip(dyn, vals, strict=True):
            full[i] = v
        p, a, k = jax.tree_util.tree_unflatten(tree, full)
        return fn(p, *a, **k)

    closed, shapes = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
    out = closed, jax.tree_util.tree_structure(shapes)
    if key is not None and not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
        _CACHE[key] = out
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return out


def trace(
    fn: Callable, params: Params, args: tuple, kwargs: dict
) -> tuple[ClosedJaxpr, PyTreeDef, list]:
    """The jaxpr of ``fn(params, *args, **kwargs)`` over its array leaves (the others are
    static), the output tree, and those array leaves in order (params' leaves first)."""
    flat, tree = jax.tree_util.tree_flatten((params, args, kwargs), is_leaf=is_quantized)
    dyn = [i for i, x in enumerate(flat) if is_array(x)]
    specs = [_spec(flat[i]) for i in dyn]
    closed, out_tree = _traced(fn, tree, flat, dyn, specs)
    for kp, leaf in flatten(params)[0]:
        if not is_array(leaf):
            raise TypeError(
                f"params leaf {path_str(kp)!r} is a {type(leaf).__name__}, not an "
                "array; pass static settings as arguments of fn, not in params"
            )
    return closed, out_tree, [flat[i] for i in dyn]
