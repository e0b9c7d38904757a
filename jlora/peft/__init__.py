"""Hugging Face PEFT adapter files: ``adapter_model.safetensors`` + ``adapter_config.json``.

:func:`load` reads a directory PEFT's ``save_pretrained`` wrote into a jlora adapter and
:func:`save` writes one PEFT loads. ``module_fn(path, index)`` gives the torch module of a
jlora key path and stack index; :func:`default_module` is the documented default and
:func:`torch_module` the one for a tree in torch's own naming.

The package, one concern a module, each reading and writing its part of the file:
``linear`` (the LoRA factors of linear, embedding and conv modules), ``whole`` (modules
trained in full, token rows), ``params`` (``target_parameters``), ``bias`` (trained
biases); ``files`` the whole directory; ``config`` the JSON config and the node every
loader builds; ``keys`` the format's names; ``axes`` which axes of a leaf the factors
belong to and how paths map to modules; ``base`` checks of base layers saved beside the
adapter; ``torch_conv`` convolution layouts; ``file`` the state of one file being read.
"""

from jlora.peft.axes import default_module as default_module
from jlora.peft.axes import torch_module as torch_module
from jlora.peft.files import load as load
from jlora.peft.files import save as save
from jlora.peft.keys import CONFIG as CONFIG
from jlora.peft.keys import EMBEDDING as EMBEDDING
from jlora.peft.keys import LAYER_SEGMENTS as LAYER_SEGMENTS
from jlora.peft.keys import LINEAR as LINEAR
from jlora.peft.keys import PREFIX as PREFIX
from jlora.peft.keys import WEIGHTS as WEIGHTS

__all__ = ["CONFIG", "PREFIX", "WEIGHTS", "default_module", "load", "save", "torch_module"]
