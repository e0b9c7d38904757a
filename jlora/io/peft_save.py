"""Writing a jlora adapter as a PEFT adapter directory (``jlora.peft.save``).

Keys and layouts are ``jlora.io.peft``'s (its module docstring); the pieces beside the
LoRA factors (modules trained in full, token rows, target_parameters, trained biases)
are written by their own modules, as ``load`` reads them.
"""

from __future__ import annotations

import json
import re

import numpy as np
import safetensors.numpy

from jlora.adapter import LoraNode, adapter_nodes, is_whole
from jlora.config import LoraError
from jlora.io import atomic, peft_bias, peft_config, peft_params, peft_whole, torch_conv
from jlora.io.peft_axes import EMBEDDING, LINEAR, PREFIX, WEIGHTS, default_module
from jlora.targets import Adapter
from jlora.transforms.combine import combine_adapters

CONFIG = peft_config.CONFIG


def _stack_shape(node) -> tuple[int, ...]:
    return tuple(node.shape[ax] for ax in node.stack_axes)


def save(  # noqa: PLR0913 (a public signature: keyword options)
    path: str,
    adapter: Adapter,
    *,
    module_fn=default_module,
    prefix: str = PREFIX,
    base_model_name_or_path: str | None = None,
    embeddings: str = r"embed",
    convs: str | None = r"(?i)conv",
    initial=None,
    fan_in_fan_out: bool = False,
    parameters: tuple[str, ...] = (),
) -> None:
    """Write ``adapter`` as a PEFT adapter directory (replaced only once fully written).

    Args:
      path: the directory (PEFT's ``save_pretrained`` layout).
      adapter: a jlora adapter (LoRA, rsLoRA or DoRA; not a stacked one).
      module_fn: ``(jlora_path, stack_index) -> torch module path``.
      prefix: put before each module (PEFT's ``base_model.model.``).
      base_model_name_or_path: recorded in the config for ``PeftModel.from_pretrained``.
      embeddings: a regex (``re.search`` on the jlora path) for tables that are torch
        ``nn.Embedding`` modules, saved under PEFT's ``lora_embedding_A/B`` keys.
      convs: a regex for kernels that are torch ``nn.ConvNd`` modules (of those with
        several in axes), saved in PEFT's conv layout: ``lora_A.weight (r, in, *k)``,
        ``lora_B.weight (out, r, 1, ...)`` (:mod:`jlora.io.torch_conv`); None: none.
      initial: for an adapter made with ``init="pissa"``/``"olora"`` (trained on the
        residual base), the adapter as ``init`` returned it: the file then holds plain
        LoRA for the original base, ``[A | A0]``, ``[B; -B0]`` at rank ``2r`` (PEFT's
        ``path_initial_model_for_weight_conversion``).
      fan_in_fan_out: the torch modules store their weight ``(in, out)`` (GPT-2's
        ``Conv1D``): written to the config, as PEFT does for such models. The factors are
        the same either way; PEFT reads the flag when it merges.
      parameters: leaf names that are torch parameters rather than modules' weights,
        saved as PEFT's ``target_parameters`` (``gate_up_proj``, ``down_proj`` of
        transformers' fused MoE experts: the expert axis is the last stacked axis), in
        the order the torch module registers them (PEFT nests their wrappers that way).

    Returns:
      Nothing; ``path`` holds ``adapter_model.safetensors`` and ``adapter_config.json``.

    Raises:
      LoraError: a stacked adapter, a variant PEFT cannot hold, or a directory that cannot
        be written (a previous directory at ``path`` stays as it was).

    Examples:
      >>> import json, os, tempfile
      >>> params = {"params": {"q_proj": {"kernel": jnp.ones((4, 6))}}}
      >>> ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets="q_proj"))
      >>> d = tempfile.mkdtemp()
      >>> jlora.peft.save(d, ad)
      >>> config = json.load(open(os.path.join(d, "adapter_config.json")))
      >>> config["r"], config["target_modules"]
      (2, ['q_proj'])
    """
    if initial is not None:  # W_res + s A B = W + s (A B - A0 B0)
        adapter = combine_adapters([adapter, initial], [1.0, -1.0], method="cat")
    nodes = adapter_nodes(adapter)
    biases = peft_bias.trained(nodes)  # biases trained on their own (not whole modules)
    tensors, whole = peft_whole.save_tensors(
        {p: n for p, n in nodes.items() if p not in biases}, module_fn, prefix, convs
    )
    params_t, param_modules, target_parameters = peft_params.save_tensors(
        nodes, parameters, module_fn, prefix
    )
    tensors.update(params_t)
    lora_t, modules = _lora_tensors(nodes, parameters, module_fn, prefix, embeddings, convs)
    tensors.update(lora_t)
    bias_t, bias = peft_bias.save_tensors(biases, set(modules), module_fn, prefix)
    tensors.update(bias_t)
    config = {
        **peft_config.config_of(modules, base_model_name_or_path, param_modules),
        **whole,
        "fan_in_fan_out": bool(fan_in_fan_out),
        "bias": bias,
        "target_parameters": target_parameters or None,
    }
    some = {getattr(n, "layers", None) for n in nodes.values() if not is_whole(n)}
    if len(some) == 1 and (layers := next(iter(some))) is not None:  # all on the same layers
        config["layers_to_transform"] = list(layers)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic.write_dir(
        path,
        {
            WEIGHTS: safetensors.numpy.save(tensors, {"format": "pt"}),
            CONFIG: json.dumps(config, indent=2, sort_keys=True).encode(),
        },
    )


def _lora_tensors(nodes: dict, parameters, module_fn, prefix: str, embeddings: str, convs):
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
