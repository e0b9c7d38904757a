"""Deprecated path: use ``jlora.adapter_nodes``, not ``jlora.adapter.adapter_nodes``.

The module is private now; its implementation is ``jlora._src.adapter``.
"""

from jlora._src.moved import forward

__getattr__ = forward("jlora.adapter", "jlora._src.adapter")
