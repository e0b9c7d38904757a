"""Hugging Face PEFT adapter files: ``adapter_model.safetensors`` + ``adapter_config.json``.

PEFT keys name torch modules: ``base_model.model.<module>.lora_A.weight`` ``(r, in)``,
``.lora_B.weight`` ``(out, r)`` and, with DoRA, ``.lora_magnitude_vector`` ``(out,)``;
an ``nn.Embedding`` has ``.lora_embedding_A`` ``(r, vocab)`` and ``.lora_embedding_B``
``(d, r)`` instead (the same transposes: jlora's ``a (vocab, r)``, ``b (r, d)``).
A jlora node is ``a`` ``(*stack, in, r)``, ``b`` ``(*stack, r, out)``: one PEFT module
per index of its stacked axes. ``module_fn(path, index)`` gives the module of a
jlora key path and stack index; :func:`default_module` is the documented default.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jlora.adapter import LayersNode
from jlora.config import LoraError
from jlora.io import (
    peft_axes,
    peft_base,
    peft_bias,
    peft_config,
    peft_params,
    peft_whole,
    torch_conv,
)
from jlora.io.peft_axes import EMBEDDING as EMBEDDING
from jlora.io.peft_axes import LAYER_SEGMENTS as LAYER_SEGMENTS  # jlora.peft's names
from jlora.io.peft_axes import LINEAR as LINEAR
from jlora.io.peft_axes import PREFIX as PREFIX
from jlora.io.peft_axes import WEIGHTS as WEIGHTS
from jlora.io.peft_axes import default_module as default_module
from jlora.io.peft_axes import torch_module as torch_module
from jlora.io.peft_file import PeftFile
from jlora.io.peft_save import save as save
from jlora.targets import _NOT_KERNELS, Params, flatten, matches, path_str
from jlora.transforms.check import check, check_finite

CONFIG = peft_config.CONFIG
__all__ = ["CONFIG", "PREFIX", "WEIGHTS", "default_module", "load", "save", "torch_module"]


def load(
    path: str,
    params: Params,
    fn=None,
    *args,
    module_fn=default_module,
    prefix: str = PREFIX,
    axes=None,
    dtype=None,
    **kwargs,
):
    """A PEFT adapter directory as a jlora adapter for ``params`` (``init``'s structure).

    PEFT's factors are made for torch's layout (``lora_A`` ``(r, in)`` for a weight that
    torch keeps ``(out, in)``). Which axes of a jlora leaf are "in" cannot be told from a
    square weight's shape, so pass the model: with ``fn`` each target's axes are learned
    from how ``fn`` uses it, as :func:`jlora.init` does, and any layout (Flax's
    ``(in, out)``, torch's ``(out, in)`` with ``x @ W.T``, head-split kernels) loads
    right. Without ``fn`` Flax's convention is assumed (recorded as
    ``axes_from="assumed"``), and ``jlora.apply`` refuses any use that contradicts it.

    Args:
      path: a directory written by PEFT's ``save_pretrained`` (or :func:`save`).
      params: the base the adapter was trained on (jlora layout, may hold NF4 leaves).
      fn: optional model ``fn(params, *args, **kwargs)`` to learn each target's axes from.
      *args: example inputs for ``fn`` (only shapes matter).
      module_fn: ``(jlora_path, stack_index) -> torch module path``, as in :func:`save`.
      prefix: put before each module (PEFT's ``base_model.model.``).
      axes: optional ``{jlora_path: (stack_axes, in_axes, out_axes)}``, taking precedence
        over what ``fn`` shows.
      dtype: cast the factors (default: as stored).
      **kwargs: example keyword inputs for ``fn`` (none named like ``load``'s own).

    Returns:
      The adapter, with ``init``'s tree structure for ``params``.

    Raises:
      LoraError: unsupported config fields, keys that match no parameter, modules
        missing for some layers, saved base layers that differ from ``params``, or
        shapes that do not fit ``params`` (a torch-layout kernel loaded without ``fn``).

    Examples:
      >>> import tempfile
      >>> params = {"q_proj": {"weight": jnp.ones((6, 4))}}  # torch's (out, in)
      >>> fn = lambda p, x: x @ p["q_proj"]["weight"].T
      >>> mine = jlora.init(jax.random.key(0), params, jlora.LoraConfig(
      ...     rank=2, targets=("q_proj",)), fn, jnp.ones((1, 4)))
      >>> d = tempfile.mkdtemp()
      >>> jlora.peft.save(d, mine)
      >>> node = jlora.peft.load(d, params, fn, jnp.ones((1, 4)))["q_proj"]["weight"]
      >>> node.in_axes, node.a.shape, node.axes_from
      ((1,), (4, 2), 'fn')
    """
    config = peft_config.read(path)
    file = PeftFile(_read_tensors(path), config, module_fn, prefix, dtype)
    flat, treedef = flatten(params)
    learned = peft_axes.learn(fn, params, flat, config, args, kwargs)
    out = []
    for kp, leaf in flat:
        p = path_str(kp)
        axes_p = (
            ((axes or {})[p], "given")
            if p in (axes or {})
            else ((learned[p], "fn") if p in learned else None)
        )
        node = (
            peft_whole.load_node(p, leaf, file)
            or peft_params.load_node(p, leaf, file, axes_p)
            or _node(p, leaf, file, axes_p)
        )
        out.append(node)
    out = peft_bias.load(flat, out, file)
    if config.get("ensure_weight_tying"):
        peft_base.tied_heads(file, EMBEDDING)
    if file.unused:
        raise LoraError(
            f"{path}: {len(file.unused)} PEFT keys match no parameter of params, e.g. "
            f"{sorted(file.unused)[:3]}; the mapping used (module_fn) gives "
            f"{peft_axes.mapping(flat, config, module_fn, prefix, learned)}; pass a "
            "module_fn that maps jlora paths to these modules"
        )
    if not any(n is not None for n in out):
        raise LoraError(f"{path}: no adapter weights found")
    adapter = jax.tree_util.tree_unflatten(treedef, out)
    check(params, adapter, finite=False)
    check_finite(adapter, "adapter", f"the file in {path!r} holds a diverged adapter")
    return adapter


def _read_tensors(path: str) -> dict:
    """The file's tensors, read (memory-mapped) by ``safetensors``; a damaged file is a
    LoraError."""
    file = os.path.join(path, WEIGHTS)
    try:
        with safetensors.safe_open(file, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except OSError as e:
        raise LoraError(f"cannot read {file}: {e}") from None
    except Exception as e:  # safetensors' own error type is not part of its public API
        raise LoraError(
            f"{file} is not a valid safetensors file ({e}); it may be truncated "
            "or corrupted: save it again"
        ) from None


def _node(p: str, leaf: Any, file: PeftFile, axes: Any) -> Any:
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

    def get(m, part):
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

    def cast(xs):
        return jnp.asarray(np.stack(xs).reshape(stack + xs[0].shape), file.dtype)

    factors = (cast(a), cast(b), cast(mag) if mag else None)
    kernel = (shape, (stack_axes, in_axes, out_axes))
    node = peft_config.node(config, factors, rank, alpha, kernel, origin)
    return (
        node
        if layers is None
        else LayersNode(node=node, layers=layers, length=np.shape(leaf)[stack_axes[0]])
    )


def _factors(p, kernel, modules, get, parts, rank, origin):
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


def _some_layers(present, modules, shape, stack, stack_axes):
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


def _factor_keys(p: str, modules: dict, tensors: dict, prefix: str):
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
    return next(parts[idx] for idx in present), present
