"""Hugging Face PEFT adapter files: ``adapter_model.safetensors`` + ``adapter_config.json``.

The implementation of the public :mod:`jlora.peft` (whose docstring says what it does).

The package, one concern a module, each reading and writing its part of the file:
``linear`` (the LoRA factors of linear, embedding and conv modules), ``whole`` (modules
trained in full, token rows), ``params`` (``target_parameters``), ``bias`` (trained
biases); ``files`` the whole directory; ``config`` the JSON config and the node every
loader builds; ``keys`` the format's names; ``axes`` which axes of a leaf the factors
belong to and how paths map to modules; ``base`` checks of base layers saved beside the
adapter; ``torch_conv`` convolution layouts; ``file`` the state of one file being read.
"""
