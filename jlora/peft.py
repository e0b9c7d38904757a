"""Hugging Face PEFT adapter files: ``adapter_model.safetensors`` + ``adapter_config.json``.

:func:`load` reads a directory PEFT's ``save_pretrained`` wrote into a jlora adapter and
:func:`save` writes one PEFT loads. ``module_fn(path, index)`` gives the torch module of a
jlora key path and stack index; :func:`default_module` is the documented default and
:func:`torch_module` the one for a tree in torch's own naming. ``CONFIG``, ``WEIGHTS``
and ``PREFIX`` are the file names and the module-name prefix PEFT uses.
"""

from jlora._src.peft.axes import default_module as default_module
from jlora._src.peft.axes import torch_module as torch_module
from jlora._src.peft.files import load as load
from jlora._src.peft.files import save as save
from jlora._src.peft.keys import CONFIG as CONFIG
from jlora._src.peft.keys import PREFIX as PREFIX
from jlora._src.peft.keys import WEIGHTS as WEIGHTS

__all__ = ["CONFIG", "PREFIX", "WEIGHTS", "default_module", "load", "save", "torch_module"]
