"""What ``apply`` needs to serve a batch that mixes adapters (``jlora.stack``): the
batch's adapter ids, checked against the stack (``check_ids``), and where each argument
carries the examples (``example_layout``), which the example-axis analysis
(:mod:`jlora._src.interpret.example_axis`) starts from."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jlora._src.adapter import StackedNode
from jlora._src.config import LoraError
from jlora._src.interpret.example_axis import Axis
from jlora._src.interpret.trace import is_array
from jlora._src.targets import path_str


def check_ids(nodes: list, adapter_ids: ArrayLike | None) -> jax.Array | None:
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


def example_layout(
    args: tuple, kwargs: dict, n: int, example_axes: int | Sequence[int | None] | None = None
) -> list:
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
