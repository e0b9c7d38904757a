"""Training memory per method, the source article's table as a tool.

``estimate(shape, method, ...)`` counts the bytes of weights, gradients, optimizer states
and activations of a Llama-style model for full fine-tuning, LoRA and QLoRA (each
quantization format at its own bits per parameter); ``table`` prints rows of it, as
``jlora memory`` does. ``benchmarks/memory.py`` checks the estimate against XLA's
``memory_analysis()`` of real training steps.

>>> from jlora import memory
>>> lora = memory.estimate(memory.LLAMA_7B, "lora", rank=8, batch=1, seq=512)
>>> full = memory.estimate(memory.LLAMA_7B, "full-fp32", batch=1, seq=512)
>>> lora["total"] < full["total"] / 4
True
"""

from jlora._src.memory import ARTICLE as ARTICLE
from jlora._src.memory import ARTICLE_TOKENS as ARTICLE_TOKENS
from jlora._src.memory import LLAMA_7B as LLAMA_7B
from jlora._src.memory import METHODS as METHODS
from jlora._src.memory import Shape as Shape
from jlora._src.memory import estimate as estimate
from jlora._src.memory import table as table

__all__ = ["ARTICLE", "ARTICLE_TOKENS", "LLAMA_7B", "METHODS", "Shape", "estimate", "table"]
