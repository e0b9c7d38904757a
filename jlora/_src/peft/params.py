"""PEFT's ``target_parameters``: LoRA on raw parameters, e.g. fused MoE expert weights.

PEFT's ``ParamWrapper`` adapts one ``nn.Parameter`` of a module. For a 3-D
expert weight (``E`` experts; transformers keeps it ``(E, out, in)``)
``lora_A.weight`` is ``(r E, in)`` and ``lora_B.weight`` ``(out, r E)``; expert
``e`` has ``A_e = lora_A.reshape(E, r, in)[e]`` (expert-major rows) and
``B_e = lora_B.reshape(out, r, E)[..., e]`` (expert-minor columns), and its
update is ``s B_e A_e``. A 2-D parameter is a plain linear one. Several
parameters of one module nest their wrappers in the module's parameter order:
the first is innermost, its keys under ``<module>.base_layer.[...]``; the last
is ``<module>.lora_A.weight``. A jlora node adapts the leaf with the expert
axis stacked (the last stacked axis; any before it index layers, as for
modules).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.adapter import LoraNode, default_axes
from jlora._src.config import LoraError
from jlora._src.peft import config as peft_config
from jlora._src.peft.axes import ModuleFn
from jlora._src.peft.file import PeftFile
from jlora._src.peft.keys import BASE_LAYER, LINEAR

A, B = LINEAR


def targeted(p: str, config: dict, module: str) -> str | None:
    """The parameter name when ``config``'s ``target_parameters`` names leaf ``p`` of
    ``module`` (PEFT matches ``<module>.<param>`` exactly or by a ``.``-suffix)."""
    names = config.get("target_parameters") or ()
    param = p.split("/")[-1]
    key = f"{module}.{param}"
    return param if any(key == n or key.endswith("." + n) for n in names) else None


def _fits(la: np.ndarray, lb: np.ndarray, e: int, n_in: int, n_out: int, rank: int) -> bool:
    return la.shape == (rank * e, n_in) and lb.shape == (n_out, rank * e)


def load_node(p: str, leaf: Any, file: PeftFile, axes: Any) -> LoraNode | None:
    """``p``'s node when ``target_parameters`` names it (else None)."""
    config, tensors, prefix, module_fn = file.config, file.tensors, file.prefix, file.module
    if not config.get("target_parameters"):
        return None
    shape = tuple(np.shape(leaf))
    (stack_axes, in_axes, out_axes), origin = axes or (default_axes(len(shape)), "assumed")
    layer_axes = stack_axes[:-1] if stack_axes else ()
    try:
        probe = module_fn(p, (0,) * len(layer_axes))
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    param = targeted(p, config, probe)
    if param is None:
        return None
    n_in, n_out = (math.prod(shape[ax] for ax in g) for g in (in_axes, out_axes))
    rank = int(
        peft_config.pattern(config.get("rank_pattern") or {}, f"{probe}.{param}", config["r"])
    )
    e = shape[stack_axes[-1]] if stack_axes else 1
    a_all, b_all = [], []
    for idx in np.ndindex(*(shape[ax] for ax in layer_axes)):
        module = module_fn(p, idx)
        stem = _pick(p, module, param, tensors, prefix, (e, n_in, n_out, rank), origin)
        la, lb = file.take(stem + A), file.take(stem + B)
        if e == 1 and not stack_axes:
            a_all.append(la.T)
            b_all.append(lb.T)
            continue
        a_all.append(la.reshape(e, rank, n_in).transpose(0, 2, 1))  # (E, in, r)
        b_all.append(lb.reshape(n_out, rank, e).transpose(2, 1, 0))  # (E, r, out)
    stack = tuple(shape[ax] for ax in stack_axes)

    def cast(xs: list[np.ndarray]) -> jax.Array:
        return jnp.asarray(np.stack(xs).reshape(stack + xs[0].shape[-2:]), file.dtype)

    alpha = float(
        peft_config.pattern(
            config.get("alpha_pattern") or {}, f"{probe}.{param}", config["lora_alpha"]
        )
    )
    kernel = (shape, (stack_axes, in_axes, out_axes))
    return peft_config.node(config, (cast(a_all), cast(b_all), None), alpha, kernel, origin)


def _pick(
    p: str,
    module: str,
    param: str,
    tensors: dict,
    prefix: str,
    dims: tuple[int, int, int, int],
    origin: str,
) -> str:
    """The wrapper stem of ``module`` whose factors fit ``param``'s leaf (by shape: the
    nesting order is the torch module's parameter order, which params do not carry)."""
    e, n_in, n_out, rank = dims
    stems = _all_stems(tensors, prefix + module)
    fit = [s for s in stems if _fits(tensors[s + A], tensors[s + B], e, n_in, n_out, rank)]
    if len(fit) == 1:
        return fit[0]
    have = {s[len(prefix) :]: (tensors[s + A].shape, tensors[s + B].shape) for s in stems}
    why = (
        "none of its wrappers fits"
        if not fit
        else "several of its wrappers fit, and which is which depends on the torch module's "
        "parameter order"
    )
    fix = (
        " under Flax's layout, which peft.load assumed (no fn); pass the model: "
        "jlora.peft.load(path, params, fn, *example_args)"
        if origin == "assumed" and not fit
        else ""
    )
    raise LoraError(
        f"{p!r} (target parameter {module}.{param}): the file's factors {have} "
        f"must be ({rank}*{e}, {n_in}) and ({n_out}, {rank}*{e}); {why}{fix}"
    )


def _all_stems(tensors: dict, stem: str) -> list[str]:
    out = []
    for _ in range(16):
        if stem + A in tensors:
            out.append(stem)
        stem += BASE_LAYER
    return out


def save_tensors(
    nodes: dict, parameters: Sequence[str], module_fn: ModuleFn, prefix: str
) -> tuple[dict, dict, list[str]]:
    """``(tensors, {module: node}, target_parameters)`` for the nodes of leaves named in
    ``parameters`` (torch parameter names, in their module's parameter order)."""
    tensors: dict = {}
    modules: dict = {}
    names: set = set()
    per_module: dict = {}
    for p, node in nodes.items():
        param = p.split("/")[-1]
        if param not in parameters:
            continue
        if not isinstance(node, LoraNode) or node.magnitude is not None or node.dropout:
            raise LoraError(
                f"{p!r}: PEFT's target_parameters take plain LoRA without dropout "
                f"(its ParamWrapper refuses DoRA, dropout and stacked adapters), "
                f"got {type(node).__name__}"
            )
        stack = tuple(node.shape[ax] for ax in node.stack_axes)
        a, b = np.asarray(node.a), np.asarray(node.b)
        for idx in np.ndindex(*stack[:-1]):
            module = module_fn(p, idx)
            per_module.setdefault(module, []).append((param, a[idx], b[idx]))
            modules[f"{module}.{param}"] = node
            names.add(f"{module}.{param}")
    for module, entries in per_module.items():
        entries.sort(key=lambda t: list(parameters).index(t[0]))  # innermost first
        for pos, (_, a, b) in enumerate(entries):
            stem = prefix + module + BASE_LAYER * (len(entries) - 1 - pos)
            r = a.shape[-1]
            if a.ndim == 2:  # a 2-D parameter: plain linear LoRA
                tensors[stem + A], tensors[stem + B] = a.T, b.T
            else:  # (E, in, r), (E, r, out) -> (r E, in) expert-major, (out, r E) expert-minor
                tensors[stem + A] = a.transpose(0, 2, 1).reshape(-1, a.shape[1])
                tensors[stem + B] = b.transpose(2, 1, 0).reshape(b.shape[2], r * a.shape[0])
    return tensors, modules, sorted(names)
