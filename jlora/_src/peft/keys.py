"""Every name the PEFT file format fixes, in one place."""

from jlora._src.config import LAYER_PATTERNS

#: The config file of an adapter directory.
CONFIG = "adapter_config.json"
#: The weights file, and the prefix of its keys before a module's path.
WEIGHTS, PREFIX = "adapter_model.safetensors", "base_model.model."
#: The key suffixes of a linear module's factors.
LINEAR = (".lora_A.weight", ".lora_B.weight")
#: The key suffixes of an embedding's factors.
EMBEDDING = (".lora_embedding_A", ".lora_embedding_B")
#: A table's trained rows (``trainable_token_indices``).
TOKENS = ".token_adapter.trainable_tokens_delta"
#: What a module adapted by PEFT calls the module it wraps.
BASE_LAYER = ".base_layer"
#: A bias trained with the LoRA factors (``lora_bias``).
LORA_BIAS = ".lora_B.bias"
#: Segments after which a stacked (scanned) layer index is inserted by default.
LAYER_SEGMENTS = LAYER_PATTERNS
