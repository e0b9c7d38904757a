"""Adapters on disk: orbax checkpoints (``checkpoint``) and PEFT's files (``peft``,
``safetensors_io``)."""
