"""A PEFT adapter file's state through loading: one object instead of loose arguments.

``jlora.peft.load`` reads the file's tensors and config once into a :class:`PeftFile`;
each concern's loader (linear factors, whole modules and token rows, target
parameters, biases, saved base layers) takes what it reads from it with
:meth:`PeftFile.take`, which marks the key used. Keys never taken are an error at
the end (a module name the mapping missed), so nothing in a file is dropped silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jlora._src.config import LoraError
from jlora._src.peft.axes import ModuleFn


@dataclasses.dataclass
class PeftFile:
    """The tensors and config of one PEFT adapter file, and how jlora paths name its
    modules: ``module_fn(jlora_path, stack_index)`` after ``prefix``. ``unused``: the
    keys no loader has taken yet. ``dtype``: what the factors are cast to (None: as
    stored)."""

    tensors: dict
    config: dict
    module_fn: ModuleFn
    prefix: str
    dtype: Any = None
    unused: set = dataclasses.field(default_factory=set)

    def __post_init__(self) -> None:
        self.unused = set(self.tensors)

    def module(self, path: str, idx: tuple = ()) -> str:
        """The torch module of ``path``'s stack index ``idx``, without the prefix."""
        return self.module_fn(path, idx)

    def take(self, key: str) -> Any:
        """The tensor ``key``, marked used; a LoraError when the file lacks it."""
        if key not in self.tensors:
            raise LoraError(f"the PEFT file lacks {key!r}")
        self.unused.discard(key)
        return self.tensors[key]
