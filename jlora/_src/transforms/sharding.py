"""Adapters that shard with their base: ``a`` follows the kernel's "in" sharding, ``b`` its
"out" sharding, the rank axis is replicated and stacked axes follow the kernel's."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding

from jlora._src.adapter import (
    Adapter,
    Node,
    adapter_nodes,
    is_node,
)
from jlora._src.targets import Leaf, Params, flatten, path_str


def node_sharding(leaf: Leaf, node: Node) -> Any:
    """The node with a ``NamedSharding`` in place of each array (None: leaf not sharded);
    each kind lays itself out (``placed``)."""
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    return node.placed(sharding)


def adapter_shardings(params: Params, adapter: Adapter) -> Any:
    """A tree like ``adapter`` with ``NamedSharding``s laid out after the base's.

    For a kernel sharded as ``P(None, 'model')`` (column-parallel, ``(in, out)``),
    ``a`` is replicated and ``b`` is ``P(None, 'model')``; for a row-parallel
    ``P('model', None)``, ``a`` is ``P('model', None)`` and ``b`` replicated.
    The rank axis is always replicated. ``init`` on a sharded base already places
    its adapter this way; use this for ``jax.device_put`` or ``jit``'s shardings.

    Args:
      params: the base, its arrays sharded (or not).
      adapter: an adapter of ``params`` (single or stacked).

    Returns:
      A tree like ``adapter``: each node's arrays replaced by their ``NamedSharding``,
      or ``None`` where the base leaf has no ``NamedSharding``.

    Raises:
      LoraError: an adapter that does not fit ``params``.

    Examples:
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(jax.devices()[:1], ("model",))
      >>> w = {"q": jax.device_put(jnp.ones((4, 6)), NamedSharding(mesh, P(None, "model")))}
      >>> ad = jlora.init(jax.random.key(0), w, jlora.LoraConfig(rank=2, targets="q"))
      >>> s = jlora.adapter_shardings(w, ad)["q"]
      >>> tuple(s.a.spec), tuple(s.b.spec)
      ((None, None), (None, 'model'))
    """
    leaves = {path_str(kp): leaf for kp, leaf in flatten(params)[0]}
    shardings = {p: node_sharding(leaves.get(p), n) for p, n in adapter_nodes(adapter).items()}
    flat, treedef = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=is_node)
    return jax.tree_util.tree_unflatten(treedef, [shardings[path_str(kp)] for kp, _ in flat])


def place(params: Params, adapter: Adapter) -> Adapter:
    """``adapter`` placed after its base's shardings (unchanged when the base is not sharded)."""
    shardings = adapter_shardings(params, adapter)
    nodes = jax.tree.leaves(shardings, is_leaf=lambda x: x is None or is_node(x))
    if not any(n is not None for n in nodes):
        return adapter
    return jax.tree.map(
        lambda node, sh: node if sh is None else jax.device_put(node, sh),
        adapter,
        shardings,
        is_leaf=is_node,
    )
