"""Many adapters over one base, served in one batch: ``stack``/``unstack`` the adapters,
``check_ids`` the batch's adapter ids, and ``example_layout``: where each argument's
examples lie, for the example-axis analysis (``jlora.Slots`` serves named adapters on
these; ``combine_adapters`` is in :mod:`jlora.transforms.combine`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jlora.adapter import LoraNode, StackedNode, adapter_nodes, is_node
from jlora.config import LoraError
from jlora.interpret.example_axis import Axis
from jlora.interpret.trace import is_array
from jlora.targets import Adapter, path_str


def stack(adapters) -> Adapter:
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


def same_leaves(adapters) -> list[dict]:
    found = [adapter_nodes(ad) for ad in adapters]
    for i, nodes in enumerate(found[1:], 1):
        if set(nodes) != set(found[0]):
            diff = sorted(set(nodes) ^ set(found[0]))[:3]
            raise LoraError(
                f"adapters 0 and {i} adapt different leaves ({diff}); stacked or "
                "combined adapters must target the same leaves"
            )
    return found


def rebuild(like, nodes: dict):
    """``like``'s tree with each node replaced by ``nodes[path]``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_node)
    return jax.tree_util.tree_unflatten(treedef, [nodes[path_str(kp)] for kp, _ in leaves])


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

    def pad(x, axis, r):
        return jnp.pad(x, [(0, rank - r if d == axis else 0) for d in range(x.ndim)])

    a = jnp.stack([pad(n.a, n.a.ndim - 1, n.rank) for n in nodes])
    b = jnp.stack([pad(n.b, n.b.ndim - 2, n.rank) for n in nodes])
    mag = None if first.magnitude is None else jnp.stack([n.magnitude for n in nodes])
    return StackedNode.of(nodes, a, b, mag, _origin(nodes))


def _origin(nodes) -> str:
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


def check_ids(nodes: list, adapter_ids):
    """``adapter_ids`` as an int32 array when the adapter is stacked (validated when concrete)."""
    stacked = [n for n in nodes if isinstance(n, StackedNode)]
    if not stacked:
        if adapter_ids is not None:
            raise LoraError("adapter_ids needs a stacked adapter: jlora.stack([ad1, ad2, ...])")
        return None
    if adapter_ids is None:
        raise LoraError(
            "a stacked adapter needs adapter_ids: one adapter index per example "
            "(-1 for the base alone)"
        )
    n = len(stacked[0].ranks)
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise LoraError(
            f"adapter_ids must be a 1-D integer array (one per example), got "
            f"{ids.dtype} of shape {ids.shape}"
        )
    if not isinstance(ids, jax.core.Tracer):
        bad = np.asarray(ids)[(np.asarray(ids) < -1) | (np.asarray(ids) >= n)]
        if bad.size:
            raise LoraError(
                f"adapter_ids {bad[:5].tolist()} are out of range: the stack holds "
                f"{n} adapters (ids 0..{n - 1}, or -1 for the base alone)"
            )
    return ids.astype(jnp.int32)


def example_layout(args, kwargs, n: int, example_axes=None) -> list:
    """Where each array argument carries the examples, as ``examples.analyze`` reads it.

    ``example_axes`` works as ``jax.vmap``'s ``in_axes`` over ``args``: an int, None
    (not per example) or one entry per positional argument; keyword arguments and
    the default use axis 0 of every array that is not a scalar.
    """
    if example_axes is None or isinstance(example_axes, int):
        example_axes = (0 if example_axes is None else example_axes,) * len(args)
    if not isinstance(example_axes, (tuple, list)) or len(example_axes) != len(args):
        raise LoraError(
            f"example_axes={example_axes!r} must be an int, None or one entry per "
            f"positional argument ({len(args)}), as jax.vmap's in_axes"
        )
    out: list = []
    for name, tree, axis in [
        (f"argument {i}", a, ax) for i, (a, ax) in enumerate(zip(args, example_axes, strict=True))
    ] + [(f"keyword {k!r}", v, 0) for k, v in sorted(kwargs.items())]:  # jax's order
        for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not is_array(leaf):
                continue  # static: not an input of the traced jaxpr
            if axis is None or (axis == 0 and np.ndim(leaf) == 0):
                out.append(None)
                continue
            if not -np.ndim(leaf) <= axis < np.ndim(leaf) or np.shape(leaf)[axis] != n:
                raise LoraError(
                    f"{name}{path_str(kp) and ' ' + path_str(kp)} of shape {np.shape(leaf)} "
                    f"has no example axis {axis} of size {n} ({n} adapter_ids, one per example); "
                    "say where each argument's examples lie with example_axes= (an int or "
                    "one entry per positional argument, None for one shared by all examples)"
                )
            out.append(Axis(axis % np.ndim(leaf)))
    return out
