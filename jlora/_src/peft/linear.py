"""The LoRA factors of linear, embedding and convolution modules: read into a node
(``load_node``) and written from one (``save_tensors``).

PEFT keys name torch modules: ``base_model.model.<module>.lora_A.weight`` ``(r, in)``,
``.lora_B.weight`` ``(out, r)`` and, with DoRA, ``.lora_magnitude_vector`` ``(out,)``;
an ``nn.Embedding`` has ``.lora_embedding_A`` ``(r, vocab)`` and ``.lora_embedding_B``
``(d, r)`` instead (the same transposes: jlora's ``a (vocab, r)``, ``b (r, d)``).
A jlora node is ``a`` ``(*stack, in, r)``, ``b`` ``(*stack, r, out)``: one PEFT module
per index of its stacked axes; a convolution's factors are in PEFT's conv layout
(``torch_conv``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.adapter import LayersNode, LoraNode, is_whole
from jlora._src.config import LoraError
from jlora._src.peft import axes as peft_axes
from jlora._src.peft import base as peft_base
from jlora._src.peft import config as peft_config
from jlora._src.peft import torch_conv
from jlora._src.peft.axes import ModuleFn
from jlora._src.peft.file import PeftFile
from jlora._src.peft.keys import EMBEDDING, LINEAR
from jlora._src.targets import _NOT_KERNELS, matches


def _stack_shape(node: LoraNode) -> tuple[int, ...]:
    return tuple(node.shape[ax] for ax in node.stack_axes)


def save_tensors(
    nodes: dict,
    parameters: Sequence[str],
    module_fn: ModuleFn,
    prefix: str,
    embeddings: str,
    convs: str | None,
) -> tuple[dict, dict]:
    """``(tensors, {module: node})`` for the LoRA nodes of modules (one module per stack
    index; a conv in PEFT's conv layout, a table under the embedding keys)."""
    tensors: dict = {}
    modules: dict = {}
    owner: dict[str, str] = {}  # module -> the path that took it
    for p, node in nodes.items():
        if is_whole(node) or p.split("/")[-1] in parameters:
            continue
        # some layers: only those have modules (PEFT gives the rest zero-B adapters)
        layers, node = getattr(node, "layers", None), node.lora
        if not isinstance(node, LoraNode):
            raise LoraError(f"{p!r} holds a stacked adapter; save each adapter on its own")
        _check_layout_known(p, node)
        a, b = np.asarray(node.a), np.asarray(node.b)
        mag = None if node.magnitude is None else np.asarray(node.magnitude)
        conv = convs is not None and re.search(convs, p) and len(node.in_axes) > 1
        for idx in np.ndindex(*_stack_shape(node)):
            module = module_fn(p, idx if layers is None else (layers[idx[0]], *idx[1:]))
            key = prefix + module
            part_a, part_b = EMBEDDING if re.search(embeddings, p) else LINEAR
            m = None if mag is None else mag[idx]
            la, lb, m = (
                torch_conv.to_torch(p, node, a[idx], b[idx], m) if conv else (a[idx].T, b[idx].T, m)
            )
            at = f" (stack index {idx})" if idx else ""
            if module in owner:
                raise LoraError(
                    f"{owner[module]} and {p!r}{at} both map to the PEFT module "
                    f" {module!r}, so one would overwrite the other;"
                    " pass a module_fn that names each target's own module"
                )
            owner[module] = f"{p!r}{at}"
            tensors[key + part_a], tensors[key + part_b] = la, lb
            if m is not None:
                tensors[key + ".lora_magnitude_vector"] = m
            modules[module] = node
    return tensors, modules


def _check_layout_known(path: str, node: LoraNode) -> None:
    """A leaf named ``weight`` (torch's and Equinox's ``(out, in)`` matrix) whose axes were
    assumed, not learned (``init`` without ``fn``): its A and B may play swapped roles, and
    PEFT would read a square weight's update transposed without an error."""
    if node.axes_from == "flax" and path.split("/")[-1] == "weight" and len(node.shape) == 2:
        raise LoraError(
            f"{path!r} is a 'weight' (torch's and Equinox's (out, in) layout), "
            "but its adapter was made without fn, so its in and out axes were "
            "assumed to be Flax's (in, out); PEFT could read its update "
            "transposed. Pass fn to init: jlora.init(key, params, cfg, fn, "
            "*example_args)"
        )


def load_node(p: str, leaf: Any, file: PeftFile, axes: Any) -> Any:
    """The node of ``p`` from its modules' LoRA factors (a linear, embedding or conv
    module per stack index), or None when the file adapts none of them."""
    config, tensors, prefix = file.config, file.tensors, file.prefix
    shape = tuple(np.shape(leaf))
    names = config.get("target_modules")
    if (
        len(shape) < 2
        or p.split("/")[-1] in _NOT_KERNELS
        or (isinstance(names, list) and not matches(tuple(names), p))
    ):
        return None  # PEFT adapts only modules named in target_modules
    (stack_axes, in_axes, out_axes), origin = axes or peft_axes.file_axes(
        p, shape, tensors, file.module_fn, prefix
    )
    stack = tuple(shape[ax] for ax in stack_axes)
    modules = {idx: file.module(p, idx) for idx in np.ndindex(*stack)}
    kinds = _factor_keys(p, modules, tensors, prefix)
    if kinds is None:
        return None
    (part_a, part_b), present = kinds
    if (part_a, part_b) == EMBEDDING:  # a table: (vocab, d) in torch and Flax, vocab "in";
        # PEFT applies its update where it is looked up, and at a tied head only if tying
        origin = "file" if config.get("ensure_weight_tying") else "lookup"
    layers, modules, shape, stack = _some_layers(present, modules, shape, stack, stack_axes)
    first = modules[next(iter(modules))]

    def get(m: str, part: str) -> np.ndarray:
        return file.take(prefix + m + part)

    rank = get(first, part_a).shape[0]
    a, b = _factors(p, (shape, (in_axes, out_axes)), modules, get, (part_a, part_b), rank, origin)
    n_out = math.prod(shape[ax] for ax in out_axes)
    dora = config.get("use_dora")
    mag = (
        [get(m, ".lora_magnitude_vector").reshape(n_out) for m in modules.values()] if dora else []
    )
    peft_base.check(
        p,
        leaf,
        (stack_axes, in_axes, out_axes),
        modules,
        file,
        (part_a, part_b) == EMBEDDING,
    )
    alpha = peft_config.alpha_for(config, p, first, rank)

    def cast(xs: list[np.ndarray]) -> jax.Array:
        return jnp.asarray(np.stack(xs).reshape(stack + xs[0].shape), file.dtype)

    factors = (cast(a), cast(b), cast(mag) if mag else None)
    kernel = (shape, (stack_axes, in_axes, out_axes))
    node = peft_config.node(config, factors, alpha, kernel, origin)
    return (
        node
        if layers is None
        else LayersNode(node=node, layers=layers, length=np.shape(leaf)[stack_axes[0]])
    )


def _factors(
    p: str,
    kernel: tuple[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...]]],
    modules: dict,
    get: Callable[[str, str], np.ndarray],
    parts: tuple[str, str],
    rank: int,
    origin: str,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each module's ``(a (in, r), b (r, out))``, checked against the kernel's ``(shape,
    (in_axes, out_axes))`` (a conv's read in PEFT's conv layout)."""
    shape, axes = kernel
    in_axes, out_axes = axes
    n_in, n_out = (math.prod(shape[ax] for ax in g) for g in axes)
    a, b = [], []
    for m in modules.values():
        la, lb = torch_conv.as_linear(
            p, shape, in_axes, out_axes, get(m, parts[0]), get(m, parts[1])
        )
        if la.shape != (rank, n_in) or lb.shape != (n_out, rank):
            raise peft_axes.misfit(p, m, shape, la.shape, lb.shape, (rank, n_in, n_out), origin)
        a.append(la.T)
        b.append(lb.T)
    return a, b


def _some_layers(
    present: list[tuple],
    modules: dict,
    shape: tuple[int, ...],
    stack: tuple[int, ...],
    stack_axes: tuple[int, ...],
) -> tuple[tuple[int, ...] | None, dict, tuple[int, ...], tuple[int, ...]]:
    """``(layers, modules, shape, stack)`` narrowed to the layers the file has (PEFT's
    ``layers_to_transform`` on a scanned stack); ``layers`` None when it has all."""
    if len(present) == len(modules):
        return None, modules, shape, stack
    ax = stack_axes[0]
    return (
        tuple(idx[0] for idx in present),
        {idx: modules[idx] for idx in present},
        (*shape[:ax], len(present), *shape[ax + 1 :]),
        (len(present),),
    )


def _factor_keys(
    p: str, modules: dict, tensors: dict, prefix: str
) -> tuple[tuple[str, str], list[tuple]] | None:
    """The key suffixes of the factors (``LINEAR`` or ``EMBEDDING``) of ``p``'s modules and
    the stack indices the file adapts (all, or some layers of a one-axis stack), or None
    when it adapts none of them."""
    parts = {
        idx: next((ks for ks in (LINEAR, EMBEDDING) if prefix + m + ks[0] in tensors), None)
        for idx, m in modules.items()
    }
    missing = [m for idx, m in modules.items() if parts[idx] is None]
    if len(missing) == len(modules):
        return None
    if missing and len(next(iter(modules))) != 1:
        raise LoraError(f"{p!r}: the PEFT file adapts some of its layers but not {missing[:3]}")
    present = [idx for idx in modules if parts[idx] is not None]
    return next(ks for ks in parts.values() if ks is not None), present
