"""Many adapters over one base at run time: ``stacks`` (``jlora.stack``/``unstack``: one
tree of ``n`` adapters for batches that mix them) and ``slots`` (``jlora.Slots``: named
adapters loaded into a fixed number of slots, evicted least recently used). ``apply``'s
part of a mixed batch (the ids, the example layout) is :mod:`jlora._src.interpret.mixed`."""
