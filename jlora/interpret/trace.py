"""``fn`` as a jaxpr over its array arguments: what the interpreter evaluates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jlora.numerics import mesh
from jlora.nf4 import is_nf4
from jlora.numerics import qview as qv
from jlora.targets import flatten, path_str


def is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or is_nf4(x)


def _spec(x) -> jax.ShapeDtypeStruct:
    """What ``fn`` is traced with: an NF4 leaf looks like its dequantized weight; an
    explicitly sharded array keeps its sharding."""
    if is_nf4(x):
        return qv.QView.of(x).aval
    return mesh.struct(x, np.shape(x), jnp.result_type(x))


def trace(fn, params, args, kwargs):
    """The jaxpr of ``fn(params, *args, **kwargs)`` over its array leaves (the others are
    static), the output tree, and those array leaves in order (params' leaves first)."""
    flat, tree = jax.tree_util.tree_flatten((params, args, kwargs), is_leaf=is_nf4)
    dyn = [i for i, x in enumerate(flat) if is_array(x)]

    def flat_fn(*vals):
        full = list(flat)
        for i, v in zip(dyn, vals):
            full[i] = v
        p, a, k = jax.tree_util.tree_unflatten(tree, full)
        return fn(p, *a, **k)

    specs = [_spec(flat[i]) for i in dyn]
    closed, shapes = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
    for kp, leaf in flatten(params)[0]:
        if not is_array(leaf):
            raise TypeError(f"params leaf {path_str(kp)!r} is a {type(leaf).__name__}, not an "
                            "array; pass static settings as arguments of fn, not in params")
    return closed, jax.tree_util.tree_structure(shapes), [flat[i] for i in dyn]
