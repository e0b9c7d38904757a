"""Fold an adapter into its base, or take it back out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jlora import symbolic as sy
from jlora.config import LoraError
from jlora.adapter import match
from jlora.targets import path_str


def _check_finite(changed: list) -> None:
    if not changed or any(isinstance(v, jax.core.Tracer) for _, v in changed):
        return
    finite = np.asarray(jnp.stack([jnp.isfinite(v).all() for _, v in changed]))
    if not finite.all():
        bad = changed[int(np.argmin(finite))][0]
        raise LoraError(f"merging the adapter into {bad!r} gives non-finite values "
                        "(NaN/Inf); check the adapter for diverged training before merging")


def merge(params, adapter, *, return_norms: bool = False):
    """The adapted weights as plain arrays: no inference overhead.

    LoRA: ``W0 + s * A @ B``. DoRA: ``(m / n) * (W0 + s * A @ B)`` with ``n`` the
    norm of ``W0 + s * A @ B`` per output feature.

    Args:
      params: the base.
      adapter: the adapter to fold in.
      return_norms: also return ``{path: n}`` for DoRA leaves, which
        :func:`unmerge` needs (the merged weight no longer holds ``n``).

    Raises:
      LoraError: a merged leaf is not finite (checked when called outside ``jit``,
        with one device-to-host transfer for all leaves).

    Example:
      >>> params = {"q_proj": jnp.eye(3)}
      >>> ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=1, targets=("q_proj",)))
      >>> bool((jlora.merge(params, ad)["q_proj"] == params["q_proj"]).all())  # B is zero at init
      True
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out, changed, norms = [], [], {}
    for (kp, leaf), node in zip(flat, match(params, adapter)):
        if node is None:
            out.append(leaf)
            continue
        path = path_str(kp)
        out.append(sy.materialize(sy.from_node(leaf, node, path)))
        changed.append((path, out[-1]))
        if return_norms and node.magnitude is not None:
            norms[path] = sy.node_norm(leaf, node)
    _check_finite(changed)
    merged = jax.tree_util.tree_unflatten(treedef, out)
    return (merged, norms) if return_norms else merged


def unmerge(merged, adapter, norms: dict | None = None):
    """Inverse of :func:`merge` (exact up to float rounding).

    A DoRA adapter needs the ``norms`` that ``merge(..., return_norms=True)``
    returned: we keep them in the functional return value, where PEFT caches
    them on the layer (and so can only unmerge in the same process).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(merged)
    out = []
    for (kp, leaf), node in zip(flat, match(merged, adapter)):
        if node is None:
            out.append(leaf)
            continue
        path = path_str(kp)
        if node.magnitude is not None and path not in (norms or {}):
            raise LoraError(f"unmerging the DoRA adapter at {path!r} needs the norms merge "
                            "used: merged, norms = jlora.merge(params, adapter, "
                            "return_norms=True); jlora.unmerge(merged, adapter, norms)")
        norm = None if node.magnitude is None else norms[path]
        out.append(sy.dematerialize(sy.from_node(leaf, node, path, norm)))
    return jax.tree_util.tree_unflatten(treedef, out)
