"""Many adapters over one base, served in one batch: ``stack`` makes one tree of ``n``
adapters (``StackedNode``s) for ``apply(..., adapter_ids=ids)``; ``unstack`` gives them
back (``combine_adapters``, which merges adapters into one, is in
:mod:`jlora._src.transforms.combine`)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jlora._src.adapter import Adapter, LoraNode, StackedNode, adapter_nodes, rebuild, same_leaves
from jlora._src.config import LoraError


def stack(adapters: Sequence[Adapter]) -> Adapter:
    """One adapter tree holding ``n`` adapters, for ``apply(..., adapter_ids=ids)``.

    The adapters must target the same leaves with the same axes and dropout (ranks,
    alphas, rsLoRA may differ: factors are zero-padded to the largest rank, which
    leaves every ``A @ B`` exactly as it was).

    Args:
      adapters: a non-empty sequence of adapters for one base.

    Returns:
      A tree of ``StackedNode``s: factors ``(n, *stack, in, r_max)``, ``(n, *stack, r_max, out)``.

    Raises:
      LoraError: no adapters, or adapters that differ in targets, axes or dropout.

    Examples:
      >>> p = {"q": jnp.ones((4, 6))}
      >>> ads = [jlora.init(jax.random.key(i), p, jlora.LoraConfig(rank=r, targets=("q",)))
      ...        for i, r in enumerate((1, 2))]
      >>> jlora.stack(ads)["q"].a.shape
      (2, 4, 2)
    """
    adapters = list(adapters)
    if not adapters:
        raise LoraError("stack needs at least one adapter")
    found = same_leaves(adapters)
    return rebuild(adapters[0], {p: _stack_nodes(p, [f[p] for f in found]) for p in found[0]})


def _stack_nodes(path: str, nodes: list) -> StackedNode:
    first = nodes[0]
    for i, n in enumerate(nodes):
        if not isinstance(n, LoraNode):
            why = (
                "is already stacked; stack plain adapters"
                if isinstance(n, StackedNode)
                else f"is a {type(n).__name__} (modules_to_save / trainable tokens / "
                "some layers of a stack), which mixed batches do not serve yet; merge it "
                "into the base first"
            )
            raise LoraError(f"adapter {i} at {path!r} {why}")
        same = StackedNode.SHARED
        bad = [f for f in same if getattr(n, f) != getattr(first, f)]
        if bad or (n.magnitude is None) != (first.magnitude is None):
            raise LoraError(
                f"adapters 0 and {i} differ at {path!r} in "
                f"{bad or ['DoRA']}; only rank and alpha may differ in a stack"
            )
    rank = max(n.rank for n in nodes)

    def pad(x: jax.Array, axis: int, r: int) -> jax.Array:
        return jnp.pad(x, [(0, rank - r if d == axis else 0) for d in range(x.ndim)])

    a = jnp.stack([pad(n.a, n.a.ndim - 1, n.rank) for n in nodes])
    b = jnp.stack([pad(n.b, n.b.ndim - 2, n.rank) for n in nodes])
    mag = None if first.magnitude is None else jnp.stack([n.magnitude for n in nodes])
    return StackedNode.of(nodes, a, b, mag, _origin(nodes))


def _origin(nodes: Sequence[LoraNode]) -> str:
    """The stack's ``axes_from``: ``"assumed"`` if any adapter's axes were (``apply`` then
    refuses a swapped-role use for all), else the first's."""
    origins = [n.axes_from for n in nodes]
    return "assumed" if "assumed" in origins else origins[0]


def unstack(stacked: Adapter) -> list[Adapter]:
    """The ``n`` single adapters of a stacked tree (:func:`stack`'s inverse): each node at
    its own rank, alpha and scaling, e.g. after training them together in mixed batches.

    Args:
      stacked: a tree :func:`stack` made (trained or not).

    Returns:
      The list of single adapters, in stacking order.

    Raises:
      LoraError: a tree that holds no stacked node.

    Examples:
      >>> p = {"q": jnp.ones((4, 6))}
      >>> ads = [jlora.init(jax.random.key(i), p, jlora.LoraConfig(rank=r, targets=("q",)))
      ...        for i, r in enumerate((1, 2))]
      >>> [ad["q"].a.shape for ad in jlora.unstack(jlora.stack(ads))]
      [(4, 1), (4, 2)]
    """
    nodes = adapter_nodes(stacked)
    bad = [p for p, n in nodes.items() if not isinstance(n, StackedNode)]
    if bad or not nodes:
        raise LoraError(
            f"unstack needs a tree made by jlora.stack; {bad[:1] or 'it'} is not stacked"
        )
    n = {len(node.ranks) for node in nodes.values()}.pop()
    return [rebuild(stacked, {p: node.member(i) for p, node in nodes.items()}) for i in range(n)]
