"""Biases in PEFT files: ``bias="all"`` / ``"lora_only"`` and ``lora_bias=True``.

``bias="lora_only"`` trains the biases of the adapted modules and saves them as
``<module>.base_layer.bias``; ``bias="all"`` trains every bias (``<module>.bias``
for modules without LoRA). ``lora_bias=True`` gives ``lora_B`` a bias
(``<module>.lora_B.bias``, ``(out,)``) that the layer adds scaled like the rest of
the low-rank path: ``W0 x + b0 + s (B A x + b_B)``. jlora holds each trained bias
as a :class:`~jlora._src.adapter.FullNode` on the base's bias leaf, with
``b0 + s b_B`` folded in: the same outputs and a bias that trains in full.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jlora._src.adapter import FullNode
from jlora._src.config import LoraError, scaling
from jlora._src.peft import config as peft_config
from jlora._src.peft.axes import ModuleFn
from jlora._src.peft.file import PeftFile
from jlora._src.peft.keys import BASE_LAYER, LORA_BIAS
from jlora._src.peft.whole import _torch_param
from jlora._src.targets import path_str

_SAVED = (BASE_LAYER + ".bias", ".bias")  # a trained bias: of an adapted module, of another


def load(flat: list, out: list, file: PeftFile) -> list:
    """``out`` (one node or None per leaf of ``flat``) with FullNodes for trained biases."""
    config, tensors, prefix, dtype = file.config, file.tensors, file.prefix, file.dtype
    if config.get("bias", "none") == "none" and not config.get("lora_bias"):
        return out
    if config.get("lora_bias") and config.get("use_dora"):
        raise LoraError(
            "lora_bias=True with use_dora=True: jlora cannot fold B's bias into a "
            "DoRA layer's normalized weight; save the adapter without lora_bias"
        )
    out = list(out)
    for i, (kp, leaf) in enumerate(flat):
        p = path_str(kp)
        if out[i] is not None or p.split("/")[-1] != "bias":
            continue
        _, n_stack, _ = _torch_param(p, np.ndim(leaf))
        w = np.array(leaf, np.float32 if dtype is None else dtype)
        found = False
        for idx in np.ndindex(*np.shape(leaf)[:n_stack]):
            m = prefix + file.module(p, idx)
            saved = next((m + k for k in _SAVED if m + k in tensors), None)
            if saved is not None:
                w[idx] = file.take(saved).reshape(w[idx].shape)
                found = True
            if m + LORA_BIAS in tensors:
                bias = file.take(m + LORA_BIAS).reshape(w[idx].shape)
                w[idx] = w[idx] + _scaling(config, m, tensors, prefix) * bias
                found = True
        if found:
            out[i] = FullNode(weight=jnp.asarray(w, dtype or jnp.result_type(leaf)))
    orphans = sorted(k for k in file.unused if k.endswith(LORA_BIAS))
    if orphans:
        raise LoraError(
            f"lora_bias=True: the file holds {orphans[0]!r} but params has no bias "
            "leaf for that module (a torch layer made with bias=False?); jlora "
            "folds B's bias into the module's bias: add a zero 'bias' leaf there"
        )
    return out


def trained(nodes: dict) -> dict:
    """The FullNodes on ``bias`` leaves whose module trains nothing else in full: trained
    biases (PEFT's ``bias``), not parts of a ``modules_to_save`` module."""
    whole = {
        p.rpartition("/")[0]
        for p, n in nodes.items()
        if isinstance(n, FullNode) and p.split("/")[-1] != "bias"
    }
    return {
        p: n
        for p, n in nodes.items()
        if isinstance(n, FullNode)
        and p.split("/")[-1] == "bias"
        and p.rpartition("/")[0] not in whole
    }


def save_tensors(biases: dict, adapted: set, module_fn: ModuleFn, prefix: str) -> tuple[dict, str]:
    """``(tensors, bias field)``: each trained bias as PEFT saves it, ``base_layer.bias``
    under an adapted module, ``.bias`` under another; ``"lora_only"`` when all are of
    adapted modules, else ``"all"`` (PEFT then loads the biases the file holds and
    keeps the base's others)."""
    tensors, others = {}, False
    for p, node in biases.items():
        w = np.asarray(node.weight)
        _, n_stack, _ = _torch_param(p, w.ndim)
        for idx in np.ndindex(*w.shape[:n_stack]):
            module = module_fn(p, idx)
            others |= module not in adapted
            key = ".base_layer.bias" if module in adapted else ".bias"
            tensors[prefix + module + key] = w[idx]
    return tensors, "none" if not biases else "all" if others else "lora_only"


def _scaling(config: dict, module: str, tensors: dict, prefix: str) -> float:
    rank = tensors[module + ".lora_A.weight"].shape[0]
    name = module[len(prefix) :]
    alpha = peft_config.alpha_for(config, name, name, rank)
    return scaling(alpha, rank, bool(config.get("use_rslora")))
