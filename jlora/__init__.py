"""jlora: LoRA for any JAX model, as a parameter-tree transform computed factored."""

from jlora.adapter import LoraNode as LoraNode
from jlora.adapter import init as init
from jlora.config import PRESETS as PRESETS
from jlora.config import LoraConfig as LoraConfig
from jlora.config import LoraError as LoraError
from jlora.interpret import apply as apply
from jlora.interpret import explain as explain
from jlora.merge import merge as merge
from jlora.merge import unmerge as unmerge

__version__ = "0.1.0"

__all__ = ["LoraConfig", "LoraError", "LoraNode", "PRESETS", "apply", "explain", "init",
           "merge", "unmerge"]
