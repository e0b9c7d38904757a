"""Many adapters over one base: ``stack`` for mixed batches, ``combine_adapters``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.adapter import LoraNode, StackedNode, adapter_nodes, is_node
from jlora.config import LoraError
from jlora.targets import path_str


def stack(adapters) -> Any:
    """One adapter tree holding ``n`` adapters, for ``apply(..., adapter_ids=ids)``.

    The adapters must target the same leaves with the same axes and dropout (ranks,
    alphas, rsLoRA may differ: factors are zero-padded to the largest rank, which
    leaves every ``A @ B`` exactly as it was).

    Example:
      >>> p = {"q": jnp.ones((4, 6))}
      >>> ads = [jlora.init(jax.random.key(i), p, jlora.LoraConfig(rank=r, targets=("q",)))
      ...        for i, r in enumerate((1, 2))]
      >>> jlora.stack(ads)["q"].a.shape
      (2, 4, 2)
    """
    adapters = list(adapters)
    if not adapters:
        raise LoraError("stack needs at least one adapter")
    found = [adapter_nodes(ad) for ad in adapters]
    for i, nodes in enumerate(found[1:], 1):
        if set(nodes) != set(found[0]):
            diff = sorted(set(nodes) ^ set(found[0]))[:3]
            raise LoraError(f"adapters 0 and {i} adapt different leaves ({diff}); stacked "
                            "adapters must target the same leaves")
    stacked = {path: _stack_nodes(path, [n[path] for n in found]) for path in found[0]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters[0], is_leaf=is_node)
    return jax.tree_util.tree_unflatten(treedef, [stacked[path_str(kp)] for kp, _ in leaves])


def _stack_nodes(path: str, nodes: list) -> StackedNode:
    first = nodes[0]
    for i, n in enumerate(nodes):
        if not isinstance(n, LoraNode):
            raise LoraError(f"adapter {i} at {path!r} is already stacked; stack plain adapters")
        same = ("shape", "stack_axes", "in_axes", "out_axes", "dropout")
        bad = [f for f in same if getattr(n, f) != getattr(first, f)]
        if bad or (n.magnitude is None) != (first.magnitude is None):
            raise LoraError(f"adapters 0 and {i} differ at {path!r} in "
                            f"{bad or ['DoRA']}; only rank and alpha may differ in a stack")
    rank = max(n.rank for n in nodes)
    pad = lambda x, axis, r: jnp.pad(x, [(0, rank - r if d == axis else 0)
                                         for d in range(x.ndim)])
    a = jnp.stack([pad(n.a, n.a.ndim - 1, n.rank) for n in nodes])
    b = jnp.stack([pad(n.b, n.b.ndim - 2, n.rank) for n in nodes])
    mag = None if first.magnitude is None else jnp.stack([n.magnitude for n in nodes])
    return StackedNode(a=a, b=b, scale=jnp.asarray([n.scale for n in nodes], jnp.float32),
                       ranks=tuple(n.rank for n in nodes), dropout=first.dropout,
                       shape=first.shape, stack_axes=first.stack_axes, in_axes=first.in_axes,
                       out_axes=first.out_axes, magnitude=mag)


def check_ids(nodes: list, adapter_ids):
    """``adapter_ids`` as an int32 array when the adapter is stacked (validated when concrete)."""
    stacked = [n for n in nodes if isinstance(n, StackedNode)]
    if not stacked:
        if adapter_ids is not None:
            raise LoraError("adapter_ids needs a stacked adapter: jlora.stack([ad1, ad2, ...])")
        return None
    if adapter_ids is None:
        raise LoraError("a stacked adapter needs adapter_ids: one adapter index per example "
                        "(-1 for the base alone)")
    n = len(stacked[0].ranks)
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise LoraError(f"adapter_ids must be a 1-D integer array (one per example), got "
                        f"{ids.dtype} of shape {ids.shape}")
    if not isinstance(ids, jax.core.Tracer):
        bad = np.asarray(ids)[(np.asarray(ids) < -1) | (np.asarray(ids) >= n)]
        if bad.size:
            raise LoraError(f"adapter_ids {bad[:5].tolist()} are out of range: the stack holds "
                            f"{n} adapters (ids 0..{n - 1}, or -1 for the base alone)")
    return ids.astype(jnp.int32)
