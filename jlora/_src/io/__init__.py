"""Adapters on disk: orbax checkpoints (``checkpoint``) and PEFT's files (``peft``, read
and written with the ``safetensors`` package; ``torch_conv`` for PEFT's conv layout)."""
