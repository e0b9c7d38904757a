"""Deprecated path: ``jlora.config.LoraConfig`` is ``jlora.LoraConfig``; the module is private.

Its implementation is ``jlora._src.config``.
"""

from jlora._src.moved import forward

__getattr__ = forward("jlora.config", "jlora._src.config")
