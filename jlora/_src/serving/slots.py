"""``jlora.Slots``: a fixed number of resident adapters over one base, filled and evicted
at run time without tracing anything again.

Every slot has one static layout (the template's targets and axes, the slot rank, each
adapter's scaling folded into its B), so the stacked tree that ``apply`` sees keeps
its structure, shapes and static settings whatever the slots hold: loading or
evicting writes arrays into it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora._src.adapter import Adapter, LoraNode, Node, adapter_nodes, is_node, match
from jlora._src.config import LoraError
from jlora._src.io.checkpoint import load_adapter
from jlora._src.peft import files as peft_files
from jlora._src.peft.axes import ModuleFn
from jlora._src.serving.stacks import stack
from jlora._src.targets import Params, path_str


def _write(tree: Any, i: int | jax.Array, adapter: Adapter) -> Any:
    """``tree`` with slot ``i`` holding ``adapter`` (in the slot layout)."""
    leaves = [
        s.at[i].set(x.astype(s.dtype))
        for s, x in zip(jax.tree.leaves(tree), jax.tree.leaves(adapter), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def _fit(path: str, node: Node, like: LoraNode, rank: int) -> LoraNode:
    """``node`` in the slot layout of ``like``: rank ``rank``, its scale folded into B."""
    if not isinstance(node, LoraNode):
        raise LoraError(f"{path!r}: slots hold LoRA nodes only, not {type(node).__name__}")
    for field in ("shape", "stack_axes", "in_axes", "out_axes"):
        if getattr(node, field) != getattr(like, field):
            raise LoraError(
                f"{path!r} has {field}={getattr(node, field)} but the slots' "
                f"template has {getattr(like, field)}: load it for the same base "
                "and layout (peft.load with fn learns torch-layout axes)"
            )
    if (node.magnitude is None) != (like.magnitude is None):
        raise LoraError(f"{path!r}: DoRA and plain LoRA adapters cannot share slots")
    if node.invocation:  # its static tokens would change the slots' layout (a retrace)
        raise LoraError(
            f"{path!r} is an activated LoRA (invocation tokens "
            f"{node.invocation}), which slots do not serve yet; serve it with "
            "jlora.stack and apply(..., lora_mask=jlora.alora_mask(...))"
        )
    if node.rank > rank:
        raise LoraError(
            f"{path!r} has rank {node.rank}, more than the slot rank {rank}; "
            f"make the slots with rank={node.rank}"
        )
    extra = rank - node.rank
    a = jnp.pad(node.a, [(0, 0)] * (node.a.ndim - 1) + [(0, extra)])
    b = jnp.pad(node.b * node.scale, [(0, 0)] * (node.b.ndim - 2) + [(0, extra), (0, 0)])
    return dataclasses.replace(
        like,
        a=a,
        b=b,
        magnitude=node.magnitude,
        rank=rank,
        alpha=float(rank),
        rslora=False,
        dropout=0.0,
    )


class Slots:
    """``n`` adapter slots over one base: load adapters by name at run time, evict the
    least recently used, pin some, and give each batch its ``adapter_ids``.

    Loading or evicting never traces again: every slot shares one static layout (the
    template's targets and axes at ``rank``, each adapter's scaling folded into its
    B), so a jitted ``apply`` over ``slots.tree`` compiles once. The methods are safe
    to call from several threads; :meth:`batch` returns a tree and ids from the same
    moment (the tree's arrays are never changed in place).

    Args:
      params: the base the adapters were made for.
      template: an adapter of ``params`` whose targets and axes every slot takes.
      n: the number of slots.
      rank: the slot rank (default: the template's largest); an adapter of a lower
        rank is zero-padded, which leaves its ``A @ B`` unchanged.
      sources: ``{name: source}`` to load on first use (see :meth:`load`).
      fn: passed to ``jlora.peft.load`` for PEFT directories, which then learns each
        target's axes from the model (needed for torch-layout weights).
      example_args: ``fn``'s arguments after the params, for ``jlora.peft.load``.
      module_fn: ``(jlora_path, stack_index) -> torch module path`` for PEFT directories
        whose modules are named otherwise than jlora's default (a Hugging Face model's
        ``model.layers.0.self_attn.q_proj``), as ``jlora.peft.load`` takes it.
      prefix: put before each PEFT module name, as ``jlora.peft.load`` takes it.

    Raises:
      LoraError: ``n < 1``, or a template holding nodes other than LoRA's.

    Examples:
      >>> p = {"q": jnp.ones((4, 6))}
      >>> make = lambda i, r: jlora.init(jax.random.key(i), p, jlora.LoraConfig(rank=r,
      ...                                targets=("q",)))
      >>> slots = jlora.Slots(p, make(0, 2), n=2, rank=4)
      >>> slots.load("math", make(1, 2)), slots.load("code", make(2, 4))
      (0, 1)
      >>> slots.ids(["code", "math", None]).tolist()  # None: the base alone
      [1, 0, -1]
      >>> slots.load("chat", make(3, 1))  # evicts the least recently used: "code"
      1
    """

    def __init__(  # noqa: PLR0913 (a public signature: keyword options)
        self,
        params: Params,
        template: Adapter,
        n: int,
        *,
        rank: int | None = None,
        sources: dict | None = None,
        fn: Callable | None = None,
        example_args: tuple = (),
        module_fn: ModuleFn | None = None,
        prefix: str | None = None,
    ) -> None:
        if n < 1:
            raise LoraError(f"n={n}: slots need at least one slot")
        nodes = adapter_nodes(template)
        self.rank = rank or max(getattr(nd, "rank", 0) for nd in nodes.values())
        self.params, self.fn, self.example_args = params, fn, tuple(example_args)
        self._naming: dict[str, Any] = {
            k: v for k, v in (("module_fn", module_fn), ("prefix", prefix)) if v is not None
        }  # peft.load's own defaults otherwise
        self._template = template
        self._like = nodes  # each slot node takes its template node's static settings
        zero = jax.tree.map(jnp.zeros_like, self._fit_all(template))
        self.tree = stack([zero] * n)
        self.n = n
        self._lru: collections.OrderedDict = collections.OrderedDict()  # name -> slot
        self._sources: dict = dict(sources or {})
        self._pinned: set = set()
        self._lock = threading.RLock()
        self._traces = 0
        self._write = jax.jit(self._counted_write)

    def _counted_write(self, tree: Any, i: int | jax.Array, adapter: Adapter) -> Any:
        self._traces += 1  # Python runs only when jax traces, not on cached calls
        return _write(tree, i, adapter)

    def _fit_all(self, adapter: Adapter) -> Adapter:
        nodes = adapter_nodes(adapter)
        if set(nodes) != set(self._like):
            missing = sorted(set(self._like) - set(nodes))
            extra = sorted(set(nodes) - set(self._like))
            raise LoraError(
                f"the adapter's targets differ from the slots' template: missing "
                f"{missing[:4]}, extra {extra[:4]}; slots hold adapters of one "
                "set of targets"
            )
        match(self.params, adapter)  # each node's arrays fit its declared shape and rank
        fitted = {p: _fit(p, nd, self._like[p], self.rank) for p, nd in nodes.items()}
        flat, treedef = jax.tree_util.tree_flatten_with_path(self._template, is_leaf=is_node)
        return jax.tree_util.tree_unflatten(treedef, [fitted[path_str(kp)] for kp, _ in flat])

    def _read(self, source: Adapter | str | os.PathLike) -> Adapter:
        if not isinstance(source, (str, os.PathLike)):
            return source
        if os.path.isfile(os.path.join(source, "adapter_config.json")):
            return peft_files.load(
                os.fspath(source), self.params, self.fn, *self.example_args, **self._naming
            )
        return load_adapter(source, self.params)

    def _free_slot(self, keep: Iterable[str]) -> tuple[int, str | None]:
        """``(slot, name evicted from it)``: a free slot (no name), or the least recently
        used one that is not pinned or in ``keep``; nothing changes until the write."""
        used = set(self._lru.values())
        free = [i for i in range(self.n) if i not in used]
        if free:
            return free[0], None
        for name in self._lru:
            if name not in self._pinned and name not in keep:
                return self._lru[name], name
        raise LoraError(
            f"all {self.n} slots are pinned or used by this batch; unpin one or make more slots"
        )

    def load(
        self, name: str, source: Adapter | str | os.PathLike, *, keep: Iterable[str] = ()
    ) -> int:
        """Put adapter ``name`` in a slot (replacing an older copy of it) and remember
        ``source`` to reload it after an eviction.

        Args:
          name: the adapter's name.
          source: a jlora adapter directory (``save_adapter``), a PEFT directory, or an
            adapter in memory, for the slots' base, targets and layout.
          keep: names that must not be evicted to make room.

        Returns:
          The slot index.

        Raises:
          LoraError: a source whose targets, axes, variant or rank (above the slot
            rank) differ from the template, or no slot that may be evicted.
        """
        fitted = self._fit_all(self._read(source))  # read and check before any change
        with self._lock:
            slot, evicted = (
                (self._lru[name], name) if name in self._lru else self._free_slot(set(keep))
            )
            self.tree = self._write(self.tree, jnp.int32(slot), fitted)
            self._lru.pop(evicted, None)
            self._lru.pop(name, None)
            self._lru[name] = slot
            self._sources[name] = source
            return slot

    def batch(self, names: Sequence[str | None]) -> tuple[Adapter, jax.Array]:
        """``(tree, ids)`` for a batch whose row ``i`` uses adapter ``names[i]`` (None:
        the base alone), loading evicted adapters from their sources; the tree and ids
        come from the same moment.

        Raises:
          LoraError: more distinct adapters than slots, or a name never loaded.
        """
        with self._lock:
            wanted = [n for n in dict.fromkeys(names) if n is not None]
            if len(wanted) > self.n:
                raise LoraError(
                    f"the batch uses {len(wanted)} adapters but there are "
                    f"{self.n} slots; split the batch or make more slots"
                )
            for name in wanted:
                if name in self._lru:
                    self._lru.move_to_end(name)
                elif name in self._sources:
                    self.load(name, self._sources[name], keep=wanted)
                else:
                    raise LoraError(
                        f"adapter {name!r} was never loaded; call "
                        f"slots.load({name!r}, source) first"
                    )
            ids = jnp.array([-1 if n is None else self._lru[n] for n in names], jnp.int32)
            return self.tree, ids

    def ids(self, names: Sequence[str | None]) -> jax.Array:
        """The ``adapter_ids`` of a batch (see :meth:`batch`); ``slots.tree`` holds them."""
        return self.batch(names)[1]

    def pin(self, name: str) -> None:
        """Keep ``name`` resident until :meth:`unpin`."""
        with self._lock:
            if name not in self._lru:
                raise LoraError(f"adapter {name!r} is not in a slot; load it first")
            self._pinned.add(name)

    def unpin(self, name: str) -> None:
        with self._lock:
            self._pinned.discard(name)

    def evict(self, name: str) -> None:
        """Free ``name``'s slot (its source is kept: a later batch reloads it)."""
        with self._lock:
            self._lru.pop(name, None)
            self._pinned.discard(name)

    @property
    def traces(self) -> int:
        """How many times the slot write has been traced (1 once anything was loaded)."""
        return self._traces

    @property
    def resident(self) -> dict:
        """``{name: slot}``, least recently used first."""
        with self._lock:
            return dict(self._lru)
