"""PEFT's convolution LoRA layout against a jlora conv node.

PEFT adapts an ``nn.ConvNd`` (kernel ``(out, in, *k)``) with ``lora_A.weight``
``(r, in, *k)`` (a convolution ``in -> r`` with the layer's kernel) and
``lora_B.weight`` ``(out, r, 1, ...)`` (a 1x1 convolution ``r -> out``); with
DoRA, ``lora_magnitude_vector`` is ``(1, out, 1, ...)``. A jlora conv node
has its spatial and input-feature axes "in", in kernel order, and one "out"
axis: ``(*k, in, out)`` for Flax/Haiku (HWIO), ``(out, in, *k)`` for Equinox
and torch (OIHW). The input-feature axis is the in axis next to the out axis
(both layouts put them side by side); torch flattens it first.
"""

from __future__ import annotations

import numpy as np

from jlora._src.adapter import LoraNode
from jlora._src.config import LoraError


def torch_order(
    path: str, shape: tuple[int, ...], in_axes: tuple[int, ...], out_axes: tuple[int, ...]
) -> list[int]:
    """The kernel's in axes in torch's order: the input-feature axis, then the spatial ones."""
    n = len(shape)
    if tuple(out_axes) == (n - 1,) and n - 2 in in_axes:
        feat = n - 2
    elif tuple(out_axes) == (0,) and 1 in in_axes:
        feat = 1
    else:
        raise LoraError(
            f"{path!r}: a convolution kernel {tuple(shape)} must have its out axis "
            f"first (out, in, *k) or last (*k, in, out), not in axes {in_axes} and "
            f"out axes {out_axes}; pass axes= or leave it out of convs="
        )
    return [feat] + [ax for ax in in_axes if ax != feat]


def to_torch(
    path: str, node: LoraNode, a: np.ndarray, b: np.ndarray, mag: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One module's ``(lora_A, lora_B, magnitude)`` in PEFT's conv layout from jlora's
    ``a (in, r)``, ``b (r, out)``, ``mag (out,)`` of a node with several in axes."""
    order = torch_order(path, node.shape, node.in_axes, node.out_axes)
    sizes = [node.shape[ax] for ax in node.in_axes]
    a = a.reshape(*sizes, -1).transpose([node.in_axes.index(ax) for ax in order] + [len(sizes)])
    ones = (1,) * (len(sizes) - 1)
    la = np.moveaxis(a, -1, 0)
    lb = b.T.reshape(b.shape[1], b.shape[0], *ones)
    return la, lb, None if mag is None else mag.reshape(1, -1, *ones)


def as_linear(
    path: str,
    shape: tuple[int, ...],
    in_axes: tuple[int, ...],
    out_axes: tuple[int, ...],
    la: np.ndarray,
    lb: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``(lora_A, lora_B)`` as a linear module's ``(r, in)``, ``(out, r)``: a conv's
    ``(r, in, *k)``, ``(out, r, 1, ...)`` reordered to the kernel's in axes; others as
    they are."""
    if la.ndim < 3:
        return la, lb
    la = from_torch(path, shape, in_axes, out_axes, la).T
    return la, lb.reshape(lb.shape[:2]) if lb.size == lb.shape[0] * lb.shape[1] else lb


def from_torch(
    path: str,
    shape: tuple[int, ...],
    in_axes: tuple[int, ...],
    out_axes: tuple[int, ...],
    la: np.ndarray,
) -> np.ndarray:
    """jlora's ``a (in, r)`` from PEFT's conv ``lora_A (r, in, *k)``."""
    order = torch_order(path, shape, in_axes, out_axes)
    want = tuple(shape[ax] for ax in order)
    if tuple(la.shape[1:]) != want:
        raise LoraError(
            f"{path!r}: lora_A {tuple(la.shape)} does not fit the kernel {shape} "
            f"(torch order (r, in, *k) = (r, {', '.join(map(str, want))}))"
        )
    a = np.moveaxis(la, 0, -1)  # (in, *k, r) in torch order
    a = a.transpose([order.index(ax) for ax in in_axes] + [len(order)])
    return a.reshape(-1, la.shape[0])


def conv_axes(
    path: str, shape: tuple[int, ...], la_shape: tuple[int, ...], lb_shape: tuple[int, ...]
) -> tuple:
    """``(stack, in, out)`` axes of a kernel PEFT adapts as a convolution, from the
    shapes: ``(*k, in, out)`` or ``(out, in, *k)``; an ambiguous or unfitting shape is
    an error asking for ``axes=``."""
    out, n_in, k = lb_shape[0], la_shape[1], tuple(la_shape[2:])
    n = len(shape)
    found = []
    if tuple(shape) == (*k, n_in, out):
        found.append(((), tuple(range(n - 1)), (n - 1,)))
    if tuple(shape) == (out, n_in, *k):
        found.append(((), tuple(range(1, n)), (0,)))
    if len(found) != 1:
        why = "fits both" if found else "fits neither"
        raise LoraError(
            f"{path!r}: the kernel {tuple(shape)} {why} of (*k, in, out) and "
            f"(out, in, *k) for PEFT's conv lora_A {tuple(la_shape)}; pass "
            "axes={path: (stack_axes, in_axes, out_axes)}"
        )
    return found[0]
