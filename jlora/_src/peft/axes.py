"""Which axes of a jlora leaf a PEFT file's factors belong to, and how keys map.

PEFT's factors are made for torch's layout; a jlora leaf may keep Flax's
``(in, out)`` or torch's ``(out, in)``. ``learn`` reads each candidate's axes off
the model (``fn``), as ``jlora.init`` does; without it a convolution's layout is
read from the factors' shapes and anything else gets Flax's convention,
recorded as assumed (``jlora._src.adapter.AXES_FROM``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from jlora._src.adapter import default_axes
from jlora._src.config import LoraError
from jlora._src.interpret.probe import discover_axes
from jlora._src.peft import torch_conv
from jlora._src.peft.keys import LAYER_SEGMENTS, LINEAR
from jlora._src.targets import _NOT_KERNELS, Params, matches, path_str

#: ``module_fn(path, index)``: the torch module name of a jlora key path and stack index.
ModuleFn = Callable[[str, tuple], str]


def default_module(path: str, index: tuple[int, ...] = ()) -> str:
    """PEFT module path of a jlora key path: ``params/a/b_0/q_proj/kernel`` -> ``a.b.0.q_proj``.

    A leading ``params`` and the leaf's own name are dropped, ``name_N`` becomes
    ``name.N``, and stacked indices go after the last segment named in
    ``LAYER_SEGMENTS`` (else after the first): ``params/layers/attn/q/kernel``
    at index ``(3,)`` -> ``layers.3.attn.q``.

    Args:
      path: a jlora key path (``/``-joined).
      index: the stacked (scanned) indices of one layer, if any.

    Returns:
      The torch module path PEFT's keys name.

    Examples:
      >>> default_module("params/layers/self_attn/q_proj/kernel", (3,))
      'layers.3.self_attn.q_proj'
      >>> default_module("params/Dense_0/kernel")
      'Dense.0'
    """
    segs = path.split("/")
    segs = segs[1:-1] if segs[0] == "params" else segs[:-1]
    out: list[str] = []
    for s in segs:
        m = re.fullmatch(r"(.*\D)_(\d+)", s)
        out += [m.group(1), m.group(2)] if m else [s]
    if index:
        at = max((i for i, s in enumerate(out) if s in LAYER_SEGMENTS), default=0)
        out[at + 1 : at + 1] = [str(i) for i in index]
    return ".".join(out)


def torch_module(path: str, index: tuple[int, ...] = ()) -> str:
    """The module of a params tree that nests a torch state dict's names as they are
    (``tests/torch_models.py``): ``transformer/h/0/ln_1/bias`` -> ``transformer.h.0.ln_1``
    (:func:`default_module` would read ``ln_1`` as Flax's ``name_N``). Stacked indices
    go after the last ``LAYER_SEGMENTS`` segment, as there.

    Args:
      path: a jlora key path whose segments are the state dict's names.
      index: the stacked indices of one layer, if any.

    Returns:
      The torch module path.

    Examples:
      >>> torch_module("model/layers/attn/q_proj/weight", (2,))
      'model.layers.2.attn.q_proj'
    """
    segs = path.split("/")[:-1]
    if index:
        at = max((i for i, s in enumerate(segs) if s in LAYER_SEGMENTS), default=0)
        segs[at + 1 : at + 1] = [str(i) for i in index]
    return ".".join(segs)


def candidates(flat: list, config: dict) -> set[str]:
    """The leaves a PEFT file may adapt: kernels of the modules ``target_modules`` names,
    and the parameters ``target_parameters`` names (by their own name)."""
    names = config.get("target_modules")
    params = {n.split(".")[-1] for n in config.get("target_parameters") or ()}
    out = set()
    for kp, leaf in flat:
        p = path_str(kp)
        if len(np.shape(leaf)) < 2 or p.split("/")[-1] in _NOT_KERNELS:
            continue
        if (
            p.split("/")[-1] in params
            or not isinstance(names, list)
            or (names and matches(tuple(names), p))
        ):
            out.add(p)
    return out


def learn(
    fn: Callable | None, params: Params, flat: list, config: dict, args: tuple, kwargs: dict
) -> dict:
    """Each candidate's ``(stack_axes, in_axes, out_axes)`` as ``fn`` uses it ({} if no fn)."""
    if fn is None:
        return {}
    if not callable(fn):
        raise TypeError(
            f"peft.load's third argument is the model fn(params, *args), got "
            f"{type(fn).__name__}; pass the key mapping as module_fn=..."
        )
    return discover_axes(fn, params, candidates(flat, config), args, kwargs)


def mapping(flat: list, config: dict, module_fn: ModuleFn, prefix: str, learned: dict) -> str:
    """A few ``jlora path -> PEFT key stem`` pairs as the loader mapped them."""
    shown = []
    for p in sorted(candidates(flat, config))[:3]:
        leaf = dict((path_str(kp), x) for kp, x in flat)[p]
        stack = (learned.get(p) or default_axes(len(np.shape(leaf))))[0]
        try:
            shown.append(f"{p!r} -> {prefix + module_fn(p, (0,) * len(stack))!r}")
        except Exception as e:  # the caller's module_fn: show what it raised
            shown.append(f"{p!r} -> {type(e).__name__}: {e}")
    return ", ".join(shown) or "no candidate kernel (check target_modules)"


def file_axes(
    p: str, shape: tuple[int, ...], tensors: dict, module_fn: ModuleFn, prefix: str
) -> tuple:
    """``(axes, origin)``: for a kernel the file adapts as a convolution (a 3+-D
    ``lora_A``), its layout read from the shapes (``torch_conv.conv_axes``), else
    Flax's convention, assumed."""
    assumed = default_axes(len(shape)), "assumed"
    try:
        key = prefix + module_fn(p, ()) + LINEAR[0]
    except (ValueError, TypeError, KeyError, IndexError):  # it needs stack indices
        return assumed
    la = tensors.get(key)
    if la is None or la.ndim < 3:
        return assumed
    lb = tensors.get(key.replace(LINEAR[0], LINEAR[1]))
    if lb is None:
        return assumed  # (reading the factors says what is missing)
    return torch_conv.conv_axes(p, shape, la.shape, lb.shape), "file"


def misfit(
    p: str,
    m: str,
    shape: tuple[int, ...],
    la: tuple[int, ...],
    lb: tuple[int, ...],
    want: tuple[int, int, int],
    origin: str,
) -> LoraError:
    rank, n_in, n_out = want
    msg = (
        f"{p!r}: {m} has lora_A {la} and lora_B {lb}, but the kernel {shape} needs "
        f"({rank}, {n_in}) and ({n_out}, {rank})"
    )
    if sorted((la[1], lb[0])) != sorted((n_in, n_out)):  # not a layout: another model
        return LoraError(
            f"{msg}: the file's factors are for a {lb[0]} x {la[1]} weight, so "
            "the adapter was trained on a model of another size (or another "
            "model); load it onto the base it was trained for"
        )
    if origin != "assumed":
        return LoraError(msg)
    turned = (
        " (they fit it transposed: torch's (out, in) layout)"
        if (la == (rank, n_out) and lb == (n_in, rank))
        else ""
    )
    return LoraError(
        f"{msg} under Flax's (in, out) layout, which peft.load assumed because it "
        f"had no model to learn the axes from{turned}; pass the model: "
        "jlora.peft.load(path, params, fn, *example_args)"
    )
