"""Orbax checkpoints of adapters with their settings (``jlora._src.io.resume``: training states).

Both go through one orbax ``CheckpointManager`` per directory, which writes a
new version into a temporary folder and renames it into place only when
complete, then drops older versions: a save that dies half way leaves the
previous checkpoint loadable.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jlora._src.adapter import (
    Adapter,
    Node,
    StackedNode,
    adapter_nodes,
    arrays,
    from_settings,
    settings,
)
from jlora._src.config import LoraError, scaling
from jlora._src.peft.keys import CONFIG
from jlora._src.targets import Params, flatten, path_str
from jlora._src.transforms.check import check, check_finite

#: What a checkpoint's meta says it is: ``/2`` stores each node's :func:`~adapter.settings`
#: (derived from its fields) and its arrays' shapes; ``/1`` files (scale and a variant name
#: stored, a layers node flat) still load.
_FORMAT = "jlora-adapter/2"
_READS = ("jlora-adapter/1", _FORMAT)


def _manager(
    directory: str | os.PathLike, max_to_keep: int | None = None, write: bool = True
) -> ocp.CheckpointManager:
    # Only a writer removes unfinished saves: orbax does so in a background thread it
    # does not join on close, so a reader would delete another process's save in
    # progress and race the next writer's own clean-up.
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=write,
        read_only=not write,
        save_interval_steps=1 if write else 0,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=write,
    )
    with _quiet():  # a reader is read-only on purpose: orbax's warnings say so to the user
        return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=opts)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """absl (orbax's logger) held to errors while jlora opens a checkpoint."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        log.setLevel(level)


def _latest(manager: ocp.CheckpointManager, directory: str | os.PathLike, writer: str) -> int:
    step = manager.latest_step()
    if step is None:
        raise LoraError(
            f"no complete checkpoint in {os.fspath(directory)!r}; write one with jlora.{writer}"
        )
    return step


@contextlib.contextmanager
def _reading(directory: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a failure inside orbax's restore into a LoraError that names the directory."""
    try:
        yield
    except LoraError:
        raise
    except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint
        raise LoraError(
            f"cannot read the {what} in {os.fspath(directory)!r}: it is corrupt or "
            f"incomplete, or was saved with another structure ({type(e).__name__}: "
            f"{str(e)[:300]}); restore it from a copy or save it again"
        ) from e


@contextlib.contextmanager
def _writing(directory: str | os.PathLike) -> Iterator[None]:
    """A failed save (full disk, no permission) says the previous checkpoint is intact."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise LoraError(
            f"{os.fspath(directory)!r} is a file, not a directory: jlora saves a "
            "directory there; pass a new path (or remove the file)"
        )
    try:
        yield
    except Exception as e:  # OSError, or tensorstore's ValueError for a failed write
        e.add_note(
            f"jlora: saving to {os.fspath(directory)!r} failed; the previous "
            "checkpoint there (if any) is untouched; free space or fix permissions "
            "and save again"
        )
        raise


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        *parents, last = path.split("/")
        node = out
        for seg in parents:
            node = node.setdefault(seg, {})
        node[last] = value
    return out


def _settings(node: Node) -> dict:
    """A node's settings, with its arrays' shapes and dtype (what restoring needs)."""
    if isinstance(node, StackedNode):
        raise LoraError(
            "a stacked adapter (jlora.stack) does not save as one; save each "
            "adapter before stacking"
        )
    values = arrays(node)
    return {
        **settings(node),
        "shapes": {k: list(np.shape(v)) for k, v in values.items()},
        "dtype": str(jax.tree.leaves(node)[0].dtype),
    }


def _upgrade(path: str, old: dict) -> dict:
    """A ``jlora-adapter/1`` node's settings as ``/2`` writes them: rsLoRA read from the
    stored variant, a layers node's own settings nested, the arrays' shapes worked out.
    The stored scale must be what alpha, rank and rsLoRA give (every jlora node's was):
    a node that is not would load with another scale, so it is refused."""
    if old["kind"] == "full":
        return old | {"shapes": {"weight": old["shape"]}}
    if old["kind"] == "tokens":
        return old | {"shapes": {"rows": [len(old["indices"]), *old["shape"][1:]]}}
    skip = ("scale", "variant", "layers", "length", "dtype")
    lora = {k: v for k, v in old.items() if k not in skip}
    lora |= {"kind": "lora", "rslora": "rslora" in old["variant"]}
    derived = scaling(old["alpha"], old["rank"], lora["rslora"])
    if not math.isclose(old["scale"], derived, rel_tol=1e-6):
        raise LoraError(
            f"{path!r} was saved with scale {old['scale']} but alpha {old['alpha']} and "
            f"rank {old['rank']} give {derived}; an adapter's scale is derived now: load it "
            "with the jlora that saved it and save it with alpha set to the scale it needs"
        )
    shape, rank = old["shape"], old["rank"]
    stack = [shape[ax] for ax in old["stack_axes"]]
    ins, outs = (math.prod(shape[ax] for ax in old[k]) for k in ("in_axes", "out_axes"))
    shapes = {"a": [*stack, ins, rank], "b": [*stack, rank, outs]}
    if old["variant"].endswith("dora"):
        shapes["magnitude"] = [*stack, outs]
    top = lora
    if old["kind"] == "layers":
        top = {"kind": "layers", "node": lora, "layers": old["layers"], "length": old["length"]}
    return top | {"shapes": shapes, "dtype": old["dtype"]}


def save_adapter(path: str | os.PathLike, adapter: Adapter) -> None:
    """Write an adapter and its settings to the directory ``path`` (atomically replaced).

    The settings (each node's rank, alpha, rsLoRA, dropout, axes, targeted paths)
    are stored beside the arrays as JSON, so :func:`load_adapter` needs no config.

    Args:
      path: the adapter directory (created; a previous adapter there is replaced only
        once the new one is complete).
      adapter: a single adapter (save a stacked one's members before ``jlora.stack``).

    Returns:
      Nothing.

    Raises:
      LoraError: an adapter with no node, or a directory that cannot be written (the
        previous adapter stays loadable).

    Examples:
      >>> import tempfile
      >>> params = {"q_proj": jnp.ones((4, 6))}
      >>> ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets="q_proj"))
      >>> path = tempfile.mkdtemp()
      >>> jlora.save_adapter(path, ad)
      >>> back = jlora.load_adapter(path, params)
      >>> bool((back["q_proj"].a == ad["q_proj"].a).all()), back["q_proj"].rank
      (True, 2)
    """
    nodes = adapter_nodes(adapter)
    if not nodes:
        raise LoraError("adapter has no node to save")
    meta = {
        "format": _FORMAT,
        "targets": sorted(nodes),
        "nodes": {p: _settings(n) for p, n in nodes.items()},
    }
    values = _nest({p: arrays(n) for p, n in nodes.items()})
    with _writing(path), _manager(path, max_to_keep=1) as m:
        step = 0 if m.latest_step() is None else m.latest_step() + 1
        m.save(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(values), meta=ocp.args.JsonSave(meta)
            ),
        )
        m.wait_until_finished()


def load_adapter(path: str | os.PathLike, params: Params = None) -> Adapter:
    """Read an adapter saved by :func:`save_adapter`.

    Args:
      path: the adapter directory.
      params: optional base tree; when given, the adapter is returned mirroring
        it (``None`` where not adapted), the same tree structure ``jlora.init``
        gives, so jitted functions and optimizer states made for an ``init``
        adapter accept it. Without it: a nested dict of ``LoraNode`` keyed by the
        saved paths (``jlora.apply`` matches adapters to params by key path).

    Returns:
      The adapter, its factors on the default device.

    Raises:
      LoraError: no complete adapter at ``path``, a damaged one, or (with
        ``params``) one that :func:`jlora.check` refuses or that holds NaN/Inf.

    Examples:
      See :func:`save_adapter`'s.
    """
    if not os.path.isdir(path):
        raise LoraError(
            f"no adapter directory at {os.fspath(path)!r}; write one with "
            "jlora.save_adapter (PEFT directories load with jlora.peft.load)"
        )
    if os.path.isfile(os.path.join(path, CONFIG)):
        raise LoraError(
            f"{os.fspath(path)!r} is a PEFT adapter directory (it has {CONFIG}); "
            "load it with jlora.peft.load(path, params)"
        )
    with _reading(path, "adapter"), _manager(path, write=False) as m:
        step = _latest(m, path, "save_adapter")
        meta = m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or meta.get("format") not in _READS:
            raise LoraError(
                f"{os.fspath(path)!r} is not a jlora adapter (format "
                f"{meta.get('format') if isinstance(meta, dict) else None!r})"
            )
        saved = meta["nodes"]
        if meta["format"] != _FORMAT:
            saved = {p: _upgrade(p, s) for p, s in saved.items()}
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        like = {
            p: {
                k: jax.ShapeDtypeStruct(tuple(v), s["dtype"], sharding=device)
                for k, v in s["shapes"].items()
            }
            for p, s in saved.items()
        }
        restored = m.restore(
            step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(_nest(like)))
        )["arrays"]
    out = {}
    for p, s in saved.items():
        values = restored
        for seg in p.split("/"):
            values = values[seg]
        # Uncommitted arrays, like jlora.init's: a jitted function then accepts a
        # loaded adapter without compiling again (jit keys on committed-ness).
        out[p] = from_settings(s, {k: jnp.asarray(np.asarray(v)) for k, v in values.items()})
    if params is None:
        return _nest(out)
    adapter = _mirror(out, params, path)
    check(params, adapter, finite=False)  # the base is the caller's; its own check is costly
    check_finite(
        adapter,
        "adapter",
        f"the file at {os.fspath(path)!r} holds a diverged adapter; load an earlier checkpoint",
    )
    return adapter


def _mirror(nodes: dict, params: Params, path: str | os.PathLike) -> Adapter:
    flat, treedef = flatten(params)
    missing = set(nodes) - {path_str(kp) for kp, _ in flat}
    if missing:
        raise LoraError(
            f"adapter at {os.fspath(path)!r} was saved for paths "
            f"{sorted(missing)[:3]} that these params do not have; load it with "
            "the params of the base it was trained on"
        )
    for kp, leaf in flat:
        node = nodes.get(path_str(kp))
        if node is not None and tuple(node.shape) != tuple(np.shape(leaf)):
            raise LoraError(
                f"adapter at {os.fspath(path)!r} has {path_str(kp)!r} of shape "
                f"{node.shape}, params have {tuple(np.shape(leaf))}: another base"
            )
    return jax.tree_util.tree_unflatten(treedef, [nodes.get(path_str(kp)) for kp, _ in flat])
