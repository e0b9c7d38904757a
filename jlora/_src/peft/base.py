"""The base layers a PEFT file may hold, checked against ``params``.

When embedding layers are among its targets PEFT saves their base weights too
(``<module>.base_layer.weight``, ``save_embedding_layers``): an adapted
``embed_tokens`` table and an adapted ``lm_head`` kernel. Each must be the
weight of ``params`` the adapter is loaded onto, else it was trained on another
base (a resized vocabulary, say); the check reads it in torch's layout: a
table ``(vocab, d)``, a linear weight ``(out, in)`` (``(in, out)`` with
``fan_in_fan_out``, GPT-2's ``Conv1D``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jlora._src.config import LoraError
from jlora._src.peft.file import PeftFile
from jlora._src.qnode import is_quantized


def check(p: str, leaf: Any, axes: tuple, modules: dict, file: PeftFile, table: bool) -> None:
    """Compare each module's saved base weight (``<prefix><module>.base_layer.weight``)
    with ``leaf``'s slice under the node's ``axes``; the keys checked are marked used."""
    stack_axes, in_axes, out_axes = axes
    fan_in_fan_out = bool(file.config.get("fan_in_fan_out"))
    for idx, m in modules.items():
        k = f"{file.prefix}{m}.base_layer.weight"
        if k not in file.tensors:
            continue
        saved = np.asarray(file.take(k), np.float32)
        if is_quantized(leaf):  # quantized: no exact weight to compare (the factors still load)
            continue
        first, second = (in_axes, out_axes) if table or fan_in_fan_out else (out_axes, in_axes)
        w = np.transpose(
            np.asarray(leaf, np.float32), list(stack_axes) + list(first) + list(second)
        )[tuple(idx)]
        want = (math.prod(w.shape[: len(first)]), math.prod(w.shape[len(first) :]))
        if saved.shape != want:
            raise LoraError(
                f"{p!r}: the PEFT file holds its base layer {k!r} of shape "
                f"{saved.shape}, but params' weight is {want} in torch's layout (a "
                "resized vocabulary? another model?); load that weight into params "
                "first, or load the file with the model fn to learn the layout"
            )
        if not np.allclose(saved, w.reshape(want), rtol=1e-5, atol=1e-6):
            err = float(np.max(np.abs(saved - w.reshape(want))))
            raise LoraError(
                f"{p!r}: the PEFT file holds its base layer {k!r} and it differs "
                f"from params' weight (max abs difference {err:.3g}): the adapter "
                "was trained on another base; load that weight into params first"
            )


def tied_heads(file: PeftFile, embedding: tuple[str, str]) -> None:
    """With ``ensure_weight_tying`` PEFT saves a tied head's LoRA (``lm_head.lora_A``,
    ``lora_B``, ``base_layer.weight``) beside the table's: the same update transposed.
    When params hold one table for both uses, those keys are that copy: checked equal
    to the table's factors and marked used (they stay unused, and the load fails, if
    they differ)."""
    tensors, unused = file.tensors, file.unused
    part_a, part_b = embedding
    tables = [k[: -len(part_a)] for k in tensors if k.endswith(part_a)]
    for key in sorted(k for k in unused if k.endswith(".lora_A.weight")):
        head = key[: -len(".lora_A.weight")]
        for t in tables:

            def same(x: Any, y: Any) -> bool:  # (None for a tensor the file lacks)
                return np.shape(x) == np.shape(y) and np.array_equal(x, y)

            if same(tensors[key], tensors[t + part_b].T) and same(
                tensors.get(head + ".lora_B.weight"), tensors[t + part_a].T
            ):
                base, table = head + ".base_layer.weight", t + ".base_layer.weight"
                if base in tensors and not same(tensors[base], tensors.get(table)):
                    continue
                unused.difference_update({key, head + ".lora_B.weight", base})
