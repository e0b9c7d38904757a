"""jlora: LoRA for any JAX model, as a parameter-tree transform computed factored.

The public API is this module, :mod:`jlora.peft` (PEFT files) and :mod:`jlora.memory`
(the memory table); the implementation lives in ``jlora._src`` (``docs/how-it-works.md``).
``jlora.adapter``, ``jlora.config`` and ``jlora.targets`` are the old module paths, kept
with a ``DeprecationWarning``.
"""

from jlora import adapter as adapter  # deprecated paths (jlora._src.moved), not in __all__
from jlora import config as config
from jlora import memory as memory
from jlora import peft as peft
from jlora import targets as targets
from jlora._src.adapter import Adapter as Adapter
from jlora._src.adapter import LoraNode as LoraNode
from jlora._src.adapter import adapter_nodes as adapter_nodes
from jlora._src.config import PRESETS as PRESETS
from jlora._src.config import LoraConfig as LoraConfig
from jlora._src.config import LoraError as LoraError
from jlora._src.io.bitsandbytes import load_bitsandbytes as load_bitsandbytes
from jlora._src.io.checkpoint import load_adapter as load_adapter
from jlora._src.io.checkpoint import save_adapter as save_adapter
from jlora._src.io.resume import restore_checkpoint as restore_checkpoint
from jlora._src.io.resume import save_checkpoint as save_checkpoint
from jlora._src.io.shipped import load_quantized as load_quantized
from jlora._src.nf4 import NF4 as NF4
from jlora._src.numerics.quantize import dequantize as dequantize
from jlora._src.numerics.quantize import quantize as quantize
from jlora._src.optim import lorafa as lorafa
from jlora._src.optim import loraplus as loraplus
from jlora._src.optim import riemannian as riemannian
from jlora._src.qnode import Quantized as Quantized
from jlora._src.serving.slots import Slots as Slots
from jlora._src.serving.stacks import stack as stack
from jlora._src.serving.stacks import unstack as unstack
from jlora._src.targets import Params as Params
from jlora._src.targets import path_str as path_str
from jlora._src.transforms.alora import alora_mask as alora_mask
from jlora._src.transforms.apply import apply as apply
from jlora._src.transforms.apply import explain as explain
from jlora._src.transforms.check import check as check
from jlora._src.transforms.combine import combine_adapters as combine_adapters
from jlora._src.transforms.data_inits import init_eva as init_eva
from jlora._src.transforms.data_inits import init_from_data as init_from_data
from jlora._src.transforms.init import InitResult as InitResult
from jlora._src.transforms.init import init as init
from jlora._src.transforms.init import init_with_base as init_with_base
from jlora._src.transforms.merge import MergeResult as MergeResult
from jlora._src.transforms.merge import merge as merge
from jlora._src.transforms.merge import merge_with_norms as merge_with_norms
from jlora._src.transforms.merge import unmerge as unmerge
from jlora._src.transforms.sharding import adapter_shardings as adapter_shardings

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
    "adapter_nodes",
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
    "load_quantized",
    "lorafa",
    "loraplus",
    "memory",
    "merge",
    "merge_with_norms",
    "path_str",
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
