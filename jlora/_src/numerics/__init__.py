"""Pure array math under the interpreter: NF4 quantization (``quant``), lazily
dequantized views of an NF4 weight (``qview``) and DoRA's weight norm (``dora``)."""
