"""Old import paths kept working, with a ``DeprecationWarning``, after a module went private.

Until 0.1 the modules now under ``jlora._src`` sat directly under ``jlora``, and the docs
gave users names by those paths (``jlora.adapter.adapter_nodes``,
``jlora.targets.path_str``). Each old module is a file of two lines that hands
its module ``__getattr__`` to :func:`forward`.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable


def forward(old: str, new: str) -> Callable[[str], object]:
    """A module ``__getattr__`` for the old module ``old`` that forwards to ``new``.

    The warning names the public home of a name ``jlora`` exports (``jlora.path_str``);
    any other name is forwarded too, with a warning that it is private.

    >>> import warnings
    >>> getattr_ = forward("jlora.targets", "jlora._src.targets")
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     fn = getattr_("path_str")
    >>> fn.__name__, str(caught[0].message)
    ('path_str', 'jlora.targets.path_str is deprecated; use jlora.path_str')
    """

    def __getattr__(name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(importlib.import_module(new), name)
        public = name in importlib.import_module("jlora").__all__
        advice = f"use jlora.{name}" if public else "it is private now (in jlora._src)"
        warnings.warn(f"{old}.{name} is deprecated; {advice}", DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
