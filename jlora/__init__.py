"""jlora: LoRA for any JAX model, as a parameter-tree transform computed factored."""

from jlora import peft as peft

from jlora.adapter import LoraNode as LoraNode
from jlora.adapter import init as init
from jlora.check import check as check
from jlora.checkpoint import load_adapter as load_adapter
from jlora.checkpoint import restore_checkpoint as restore_checkpoint
from jlora.checkpoint import save_adapter as save_adapter
from jlora.checkpoint import save_checkpoint as save_checkpoint
from jlora.config import PRESETS as PRESETS
from jlora.config import LoraConfig as LoraConfig
from jlora.config import LoraError as LoraError
from jlora.interpret import apply as apply
from jlora.interpret import explain as explain
from jlora.merge import merge as merge
from jlora.multi import combine_adapters as combine_adapters
from jlora.multi import stack as stack
from jlora.optim import loraplus as loraplus
from jlora.quant import NF4 as NF4
from jlora.sharding import adapter_shardings as adapter_shardings
from jlora.quant import dequantize as dequantize
from jlora.quant import quantize as quantize
from jlora.merge import unmerge as unmerge

__version__ = "0.1.0"

__all__ = ["LoraConfig", "LoraError", "LoraNode", "NF4", "PRESETS", "adapter_shardings", "apply",
           "check", "combine_adapters", "dequantize", "explain", "init", "load_adapter",
           "loraplus", "merge", "peft", "quantize", "restore_checkpoint",
           "save_adapter", "save_checkpoint", "stack", "unmerge"]
