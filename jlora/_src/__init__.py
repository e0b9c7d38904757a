"""jlora's implementation. Nothing here is public: import from ``jlora`` or ``jlora.peft``.

Layers, bottom to top (each imports only those below it; ``tests/test_structure.py``
checks, and ``docs/how-it-works.md`` describes them): ``config``/``targets``/``nf4``/
``qnode`` (settings, key paths, the quantized storage) -> ``adapter`` (nodes) ->
``numerics`` (quantization formats, DoRA norms) -> ``interpret`` (the jaxpr walker, its
domains and the evaluator's rule tables) -> ``transforms`` (init, apply, merge, check,
sharding) -> ``optim``, ``io``, ``peft`` and ``serving`` (LoRA+, checkpoints, PEFT
files, stacks and slots of many adapters) -> ``memory`` and ``cli``.
"""
