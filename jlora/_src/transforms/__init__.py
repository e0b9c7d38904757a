"""The tree -> tree functions users call: ``init`` (axes learned through the interpreter),
``apply``/``explain``, ``merge``/``unmerge``, ``stack``/``combine_adapters``, ``check``
and the sharding of adapters after their base."""
