"""Deprecated path: use ``jlora.path_str``, not ``jlora.targets.path_str``.

The module is private now; its implementation is ``jlora._src.targets``.
"""

from jlora._src.moved import forward

__getattr__ = forward("jlora.targets", "jlora._src.targets")
