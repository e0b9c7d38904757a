"""Reading and writing a whole PEFT adapter directory (``jlora.peft.load``/``save``).

Each part of the file is read and written by its own module (``linear``, ``whole``,
``params``, ``bias``); this one reads the config and tensors, hands each leaf of
``params`` to them, and checks what is left over.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import safetensors
import safetensors.numpy
from jax.typing import DTypeLike

from jlora._src.adapter import Adapter, adapter_nodes, is_whole
from jlora._src.config import LoraError
from jlora._src.io import atomic
from jlora._src.peft import axes as peft_axes
from jlora._src.peft import base as peft_base
from jlora._src.peft import bias as peft_bias
from jlora._src.peft import config as peft_config
from jlora._src.peft import linear
from jlora._src.peft import params as peft_params
from jlora._src.peft import whole as peft_whole
from jlora._src.peft.axes import ModuleFn, default_module
from jlora._src.peft.file import PeftFile
from jlora._src.peft.keys import CONFIG, EMBEDDING, PREFIX, WEIGHTS
from jlora._src.targets import Params, flatten, path_str
from jlora._src.transforms.check import check, check_finite
from jlora._src.transforms.combine import combine_adapters


def load(
    path: str,
    params: Params,
    fn: Callable | None = None,
    *args: Any,
    module_fn: ModuleFn = default_module,
    prefix: str = PREFIX,
    axes: dict[str, tuple] | None = None,
    dtype: DTypeLike | None = None,
    **kwargs: Any,
) -> Adapter:
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
            or linear.load_node(p, leaf, file, axes_p)
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


def save(  # noqa: PLR0913 (a public signature: keyword options)
    path: str,
    adapter: Adapter,
    *,
    module_fn: ModuleFn = default_module,
    prefix: str = PREFIX,
    base_model_name_or_path: str | None = None,
    embeddings: str = r"embed",
    convs: str | None = r"(?i)conv",
    initial: Adapter = None,
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
        ``lora_B.weight (out, r, 1, ...)`` (:mod:`jlora._src.peft.torch_conv`); None: none.
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
    lora_t, modules = linear.save_tensors(nodes, parameters, module_fn, prefix, embeddings, convs)
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
