"""jlora: LoRA for any JAX model, as a parameter-tree transform computed factored.

Layers, bottom to top (each imports only those below it; ``tests/test_structure.py``
checks): ``config``/``targets``/``nf4`` (settings, key paths, the NF4 storage) ->
``adapter`` (nodes) -> ``numerics`` (quantization, DoRA norms) -> ``interpret``
(the jaxpr interpreter and its rule table) -> ``transforms`` (init, apply, merge,
check, sharding) -> ``optim``, ``io``, ``peft`` and ``serving`` (LoRA+, checkpoints;
PEFT files; stacks and slots of many adapters) -> ``memory`` and ``cli``.
"""

from jlora import peft as peft
from jlora.adapter import LoraNode as LoraNode
from jlora.config import PRESETS as PRESETS
from jlora.config import LoraConfig as LoraConfig
from jlora.config import LoraError as LoraError
from jlora.io.bitsandbytes import load_bitsandbytes as load_bitsandbytes
from jlora.io.checkpoint import load_adapter as load_adapter
from jlora.io.checkpoint import save_adapter as save_adapter
from jlora.io.resume import restore_checkpoint as restore_checkpoint
from jlora.io.resume import save_checkpoint as save_checkpoint
from jlora.nf4 import NF4 as NF4
from jlora.numerics.quantize import dequantize as dequantize
from jlora.numerics.quantize import quantize as quantize
from jlora.optim import lorafa as lorafa
from jlora.optim import loraplus as loraplus
from jlora.optim import riemannian as riemannian
from jlora.qnode import Quantized as Quantized
from jlora.serving.slots import Slots as Slots
from jlora.serving.stacks import stack as stack
from jlora.serving.stacks import unstack as unstack
from jlora.targets import Adapter as Adapter
from jlora.targets import Params as Params
from jlora.transforms.alora import alora_mask as alora_mask
from jlora.transforms.apply import apply as apply
from jlora.transforms.apply import explain as explain
from jlora.transforms.check import check as check
from jlora.transforms.combine import combine_adapters as combine_adapters
from jlora.transforms.data_inits import init_from_data as init_from_data
from jlora.transforms.eva import init_eva as init_eva
from jlora.transforms.init import InitResult as InitResult
from jlora.transforms.init import init as init
from jlora.transforms.init import init_with_base as init_with_base
from jlora.transforms.merge import MergeResult as MergeResult
from jlora.transforms.merge import merge as merge
from jlora.transforms.merge import merge_with_norms as merge_with_norms
from jlora.transforms.merge import unmerge as unmerge
from jlora.transforms.sharding import adapter_shardings as adapter_shardings

__version__ = "0.1.0"

__all__ = [
    "NF4",
    "PRESETS",
    "Adapter",
    "InitResult",
    "LoraConfig",
    "LoraError",
    "LoraNode",
    "MergeResult",
    "Params",
    "Quantized",
    "Slots",
    "adapter_shardings",
    "alora_mask",
    "apply",
    "check",
    "combine_adapters",
    "dequantize",
    "explain",
    "init",
    "init_eva",
    "init_from_data",
    "init_with_base",
    "load_adapter",
    "load_bitsandbytes",
    "lorafa",
    "loraplus",
    "merge",
    "merge_with_norms",
    "peft",
    "quantize",
    "restore_checkpoint",
    "riemannian",
    "save_adapter",
    "save_checkpoint",
    "stack",
    "unmerge",
    "unstack",
]
