"""PEFT's ``adapter_config.json``: written from jlora nodes, read and checked.

On reading, every field outside those jlora understands (:data:`UNDERSTOOD`) whose value
is not PEFT's default (or null) is refused by name: a file of a variant jlora does not
implement never loads as plain LoRA.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any

from jlora._src.adapter import LoraNode
from jlora._src.config import LoraError
from jlora._src.peft.keys import CONFIG

#: Config fields jlora writes at their defaults (``save`` may set the first four).
_DEFAULTS = {
    "bias": "none",
    "fan_in_fan_out": False,
    "lora_bias": False,
    "target_parameters": None,
    "layer_replication": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}
#: The fields jlora understands, at any value: it reads them (the rank, alpha and variant,
#: what is adapted and how), checks them (``bias``, ``init_lora_weights``), or they do not
#: change what the file computes (metadata; how the factors were first initialized, the
#: file holding the factors as trained; which modules were adapted, the keys saying so).
UNDERSTOOD = frozenset(
    {
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "use_dora",
        "target_modules",
        "exclude_modules",
        "rank_pattern",
        "alpha_pattern",
        "init_lora_weights",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "lora_bias",
        "fan_in_fan_out",
        "target_parameters",
        "trainable_token_indices",
        "alora_invocation_tokens",
        "ensure_weight_tying",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
    }
)
#: PEFT's defaults (0.21) of the fields jlora does not understand: a file that sets one
#: otherwise (or a field a later PEFT added, to anything but null) is refused by name.
PEFT_DEFAULTS = {
    "layer_replication": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "kasa_config": None,
    "arrow_config": None,
    "use_bdlora": None,
    "monteclora_config": None,
    "velora_config": None,
}
#: Why some of those cannot be honoured (the rest: a variant jlora does not implement).
_WHY = {
    "layer_replication": "it builds extra layers by copying base layers, which a params tree "
    "does not express; expand the base's layers yourself and load an "
    "adapter saved without layer_replication",
    "use_qalora": "QALoRA pools the input before lora_A, a different update from LoRA's",
}


def _not_understood(config: dict) -> list[str]:
    """``field=value (why)`` for each field outside :data:`UNDERSTOOD` whose value is
    neither PEFT's default nor null."""
    bad = []
    for k, v in sorted(config.items()):
        if k in UNDERSTOOD or v is None or (k in PEFT_DEFAULTS and v == PEFT_DEFAULTS[k]):
            continue
        why = _WHY.get(
            k,
            "a LoRA variant jlora does not implement"
            if k in PEFT_DEFAULTS
            else "a field jlora does not know, perhaps from a later PEFT",
        )
        bad.append(f"{k}={v!r} ({why})")
    return bad


def config_of(
    modules: dict, base_model_name_or_path: str | None, parameters: dict | None = None
) -> dict:
    """The config of ``modules`` (``{module: node}``) and target ``parameters``
    (``{module.param: node}``), which share its rank, alpha and variant fields."""
    both = {**modules, **(parameters or {})}
    if not both:
        raise LoraError("the adapter has no adapted leaf to save")
    nodes = list(both.values())
    rslora = {n.rslora for n in nodes}
    dora, dropout = {n.magnitude is not None for n in nodes}, {n.dropout for n in nodes}
    alora = {n.invocation for n in nodes}
    if len(rslora) > 1 or len(dora) > 1 or len(dropout) > 1 or len(alora) > 1:
        raise LoraError(
            "a PEFT config has one use_rslora, use_dora, lora_dropout and "
            "alora_invocation_tokens for all modules, but this adapter mixes "
            "them; save those parts separately"
        )
    invocation = alora.pop()
    r = Counter(n.rank for n in nodes).most_common(1)[0][0]
    alpha = Counter(n.alpha for n in nodes).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout.pop(),
        "use_rslora": rslora.pop(),
        "use_dora": dora.pop(),
        "target_modules": sorted({m.split(".")[-1] for m in modules}),
        "rank_pattern": {re.escape(m): n.rank for m, n in both.items() if n.rank != r},
        "alpha_pattern": {re.escape(m): n.alpha for m, n in both.items() if n.alpha != alpha},
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        **_DEFAULTS,
        # PEFT accepts aLoRA for causal language models only
        **(
            {}
            if invocation is None
            else {"alora_invocation_tokens": list(invocation), "task_type": "CAUSAL_LM"}
        ),
    }


def read(path: str) -> dict:
    try:
        with open(os.path.join(path, CONFIG)) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LoraError(f"cannot read {os.path.join(path, CONFIG)}: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{path}: peft_type {config['peft_type']!r} is not LORA")
    bad = _not_understood(config)
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        bad.append(f"bias={config['bias']!r} (PEFT's values are 'none', 'all', 'lora_only')")
    init = config.get("init_lora_weights", True)
    # EVA only chose A's start from data: the base is untouched, so the file is plain LoRA
    if isinstance(init, str) and re.match(r"pissa|olora|corda|loftq|lora_ga", init):
        bad.append(
            f"init_lora_weights={init!r} (it changed the base weights, which this file "
            "does not hold; convert the adapter with PEFT's "
            "path_initial_model_for_weight_conversion when saving)"
        )
    if bad:
        raise LoraError(f"{path}: unsupported PEFT config fields: {', '.join(bad)}")
    return config


def invocation(config: dict) -> tuple[int, ...] | None:
    """Activated LoRA's invocation tokens (``alora_invocation_tokens``), or None."""
    tokens = config.get("alora_invocation_tokens")
    if not tokens:
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise LoraError(f"alora_invocation_tokens={tokens!r} must be a list of token ids")
    return tuple(tokens)


def pattern(patterns: dict, module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def alpha_for(config: dict, path: str, module: str, rank: int) -> float:
    """A module's alpha (``alpha_pattern``), after checking its rank against ``rank_pattern``."""
    expected = pattern(config.get("rank_pattern") or {}, module, config["r"])
    if rank != expected:
        raise LoraError(f"{path!r}: lora_A has rank {rank} but the config says {expected}")
    return float(pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))


def node(config: dict, factors: tuple, alpha: float, kernel: tuple, origin: str) -> LoraNode:
    """The ``LoraNode`` of one adapted leaf read from a PEFT file: ``factors`` is ``(a, b,
    magnitude or None)`` in jlora's layout, ``kernel`` is ``(shape, (stack_axes, in_axes,
    out_axes))``, ``origin`` its ``axes_from``. What the file's config fixes for every
    node (the scale under its ``use_rslora``, the dropout, aLoRA's invocation tokens) is
    read here, in one place, for every loader."""
    a, b, magnitude = factors
    shape, axes = kernel
    return LoraNode.of(
        a,
        b,
        alpha=alpha,
        shape=shape,
        axes=axes,
        rslora=bool(config.get("use_rslora")),
        dropout=config.get("lora_dropout", 0.0),
        magnitude=magnitude,
        axes_from=origin,
        invocation=invocation(config),
    )
