"""PEFT's ``modules_to_save`` and ``trainable_token_indices`` in adapter files.

A module trained in full is saved under its own parameter names (``<module>.weight``,
``<module>.bias``: PEFT strips ``modules_to_save.default``), in torch's layout: a Flax
``kernel`` ``(in, out)`` is torch's ``weight`` ``(out, in)``, a Flax conv ``kernel``
``(*k, in, out)`` (selected by ``convs``) is torch's ``(out, in, *k)``, an
``embedding``, a norm ``scale`` or an Equinox/torch-layout ``weight`` is ``weight`` as
it is. Trained token rows are
``<module>.token_adapter.trainable_tokens_delta`` ``(k, d)`` (the new rows themselves,
despite the name), their ids in the config.
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora._src.adapter import FullNode, TokenNode
from jlora._src.config import LoraError
from jlora._src.peft.axes import ModuleFn
from jlora._src.peft.file import PeftFile
from jlora._src.peft.keys import TOKENS
from jlora._src.targets import layer_index

#: jlora leaf name -> (torch parameter name, its ndim (None: the leaf's), transposed)
_TORCH = {
    "kernel": ("weight", 2, True),
    "embedding": ("weight", 2, False),
    "scale": ("weight", 1, False),
    "bias": ("bias", 1, False),
    "weight": ("weight", None, False),
}


def _torch_param(p: str, ndim: int, conv: bool = False) -> tuple[str, int, tuple | None]:
    """``(torch name, number of leading stacked axes, order)`` of a full leaf: one stacked
    axis under a layer-list segment without an index (a scanned stack); ``order`` is the
    permutation of one layer's axes into torch's (None: as is). ``conv``: a ``kernel`` of
    3+ axes is a Flax convolution kernel ``(*k, in, out)``."""
    name = p.split("/")[-1]
    if name not in _TORCH:
        raise LoraError(
            f"{p!r} is trained in full but jlora knows no torch name for a leaf "
            f"called {name!r} (it knows {sorted(_TORCH)}); save it with "
            "jlora.save_adapter"
        )
    torch_name, torch_ndim, transposed = _TORCH[name]
    n_stack = 1 if layer_index(p) == "stack" else 0
    n = ndim - n_stack
    if conv and name == "kernel" and n > 2:
        return torch_name, n_stack, (n - 1, n - 2, *range(n - 2))
    if torch_ndim is not None and n != torch_ndim:
        raise LoraError(
            f"{p!r} has {ndim} axes ({n_stack} stacked), but torch's "
            f"{torch_name} for a {name!r} has {torch_ndim}; save it with "
            "jlora.save_adapter"
        )
    return torch_name, n_stack, (1, 0) if transposed else None


def save_tensors(
    nodes: dict, module_fn: ModuleFn, prefix: str, convs: str | None
) -> tuple[dict, dict]:
    """The file's tensors and config fields for the FullNodes and TokenNodes of ``nodes``."""
    tensors, full, tokens = {}, set(), {}
    for p, node in nodes.items():
        if isinstance(node, TokenNode):
            module = module_fn(p, ())
            tensors[prefix + module + TOKENS] = np.asarray(node.rows)
            tokens[module.split(".")[-1]] = list(node.indices)
        elif isinstance(node, FullNode):
            w = np.asarray(node.weight)
            conv = convs is not None and bool(re.search(convs, p))
            torch_name, n_stack, order = _torch_param(p, w.ndim, conv)
            for idx in np.ndindex(*w.shape[:n_stack]):
                module = module_fn(p, idx)
                tensors[f"{prefix}{module}.{torch_name}"] = (
                    w[idx] if order is None else np.transpose(w[idx], order)
                )
                full.add(module.split(".")[-1])
    return tensors, {
        "modules_to_save": sorted(full) or None,
        "trainable_token_indices": tokens or None,
    }


def load_node(p: str, leaf: Any, file: PeftFile) -> Any:
    """``p``'s FullNode or TokenNode when the file holds one, else None."""
    config, tensors, prefix, dtype, module_fn = (
        file.config,
        file.tensors,
        file.prefix,
        file.dtype,
        file.module,
    )
    shape = tuple(np.shape(leaf))
    spec = config.get("trainable_token_indices")
    if spec and len(shape) >= 2:
        try:
            module = module_fn(p, ())
        except (ValueError, TypeError, KeyError, IndexError):  # a stacked leaf: no table
            module = None
        if module is not None and prefix + module + TOKENS in tensors:
            rows = file.take(prefix + module + TOKENS)
            return TokenNode(
                rows=jnp.asarray(rows, dtype), indices=_ids(spec, module, p), shape=shape
            )
    if not config.get("modules_to_save") or p.split("/")[-1] not in _TORCH:
        return None
    torch_name, n_stack, order = _torch_param(p, len(shape), conv=True)
    keys = [f"{prefix}{module_fn(p, idx)}.{torch_name}" for idx in np.ndindex(*shape[:n_stack])]
    present = [k for k in keys if k in tensors]
    if not present:
        return None
    if len(present) < len(keys):
        raise LoraError(
            f"{p!r}: the PEFT file trains some of its layers in full but lacks "
            f"{sorted(set(keys) - set(present))[:3]}"
        )
    parts = [file.take(k) for k in keys]
    back = None if order is None else np.argsort(order)
    if any(t.ndim != len(shape) - n_stack for t in parts):
        raise LoraError(
            f"{p!r}: the PEFT file's {torch_name} {keys[0]!r} has shape "
            f"{parts[0].shape}, which does not fit params' {shape}"
        )
    torch_shape = parts[0].shape
    parts = [t if back is None else np.transpose(t, back) for t in parts]
    if any(t.shape != shape[n_stack:] for t in parts):
        raise LoraError(
            f"{p!r}: the PEFT file's {torch_name} {keys[0]!r} has shape "
            f"{torch_shape}, which does not fit params' {shape}"
        )
    return FullNode(weight=jnp.asarray(np.stack(parts).reshape(shape), dtype))


def _ids(spec: list | dict, module: str, p: str) -> tuple[int, ...]:
    if isinstance(spec, list):
        return tuple(int(i) for i in spec)
    for name, ids in spec.items():
        if re.match(rf"(.*\.)?{re.escape(name)}$", module):
            return tuple(int(i) for i in ids)
    raise LoraError(
        f"{p!r}: the PEFT file holds token rows for {module!r} but "
        f"trainable_token_indices names only {sorted(spec)}"
    )
