"""Adapters that shard with their base: ``a`` follows the kernel's "in" sharding, ``b`` its
"out" sharding, the rank axis is replicated and stacked axes follow the kernel's."""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jlora._src.adapter import (
    Adapter,
    FullNode,
    LayersNode,
    Node,
    StackedNode,
    TokenNode,
    adapter_nodes,
    is_node,
)
from jlora._src.targets import Leaf, Params, flatten, path_str


def _axis_spec(spec: tuple, axes: tuple[int, ...]) -> Any:
    """The sharding of ``axes`` flattened into one: the major axis's, if the rest are whole."""
    parts = [spec[ax] for ax in axes]
    return parts[0] if all(p is None for p in parts[1:]) else None


def node_sharding(leaf: Leaf, node: Node) -> Any:
    """The node with a ``NamedSharding`` in place of each array (None: leaf not sharded)."""
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    if isinstance(node, FullNode):  # the trained copy lies where the base leaf does
        return FullNode(weight=sharding)
    if isinstance(node, LayersNode):  # its few layers: whole along the stack axis
        whole = list(sharding.spec) + [None] * (len(node.shape) - len(sharding.spec))
        whole[node.node.stack_axes[0]] = None
        sub = types.SimpleNamespace(sharding=NamedSharding(sharding.mesh, PartitionSpec(*whole)))
        return dataclasses.replace(node, node=node_sharding(sub, node.node))
    spec = tuple(sharding.spec) + (None,) * (len(node.shape) - len(sharding.spec))
    if isinstance(node, TokenNode):  # a few rows: whole along the token axis
        rows = NamedSharding(sharding.mesh, PartitionSpec(None, *spec[1:]))
        return dataclasses.replace(node, rows=rows)
    stack = tuple(spec[ax] for ax in node.stack_axes)
    stack = ((None,) if isinstance(node, StackedNode) else ()) + stack
    ins, outs = _axis_spec(spec, node.in_axes), _axis_spec(spec, node.out_axes)

    def named(*s: Any) -> NamedSharding:
        return NamedSharding(sharding.mesh, PartitionSpec(*s))

    fields: dict[str, Any] = dict(
        a=named(*stack, ins, None),
        b=named(*stack, None, outs),
        magnitude=None if node.magnitude is None else named(*stack, outs),
    )
    return dataclasses.replace(node, **fields)


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
