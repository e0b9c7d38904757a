"""Exact-resume training state (adapter, optimizer state, data position) in orbax.

Each save is a numbered step folder written through the same ``CheckpointManager`` as
adapters (``jlora._src.io.checkpoint``): complete or absent, never half written.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jlora._src.config import LoraError
from jlora._src.io.checkpoint import _latest, _manager, _quiet, _reading, _writing


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: Any,
    *,
    data_position: Any = None,
    max_to_keep: int | None = 3,
) -> None:
    """Save a training state (any pytree: adapter, optimizer state, ...) as ``step``.

    Args:
      directory: checkpoint root; each step is a sub-folder, older ones beyond
        ``max_to_keep`` are removed once the new one is complete.
      step: the training step this state is after.
      state: the pytree to save, e.g. ``{"adapter": ad, "opt_state": opt_state}``.
      data_position: JSON-serialisable position of the data pipeline.
      max_to_keep: how many checkpoints to keep (``None`` keeps all).

    Returns:
      Nothing; the step's folder is complete on disk when this returns.

    Raises:
      LoraError: ``step`` is already saved there (orbax would skip the save silently),
        or the directory cannot be written (the previous checkpoints stay as they were).

    Examples:
      >>> import tempfile
      >>> ckpt = tempfile.mkdtemp()
      >>> state = {"adapter": {"w": jnp.ones(3)}, "step_count": jnp.array(7)}
      >>> jlora.save_checkpoint(ckpt, 7, state, data_position={"epoch": 1})
      >>> back, meta = jlora.restore_checkpoint(ckpt, state)
      >>> meta, back["adapter"]["w"].tolist()
      ({'step': 7, 'data_position': {'epoch': 1}}, [1.0, 1.0, 1.0])
    """
    meta = {"step": int(step), "data_position": data_position}
    with _writing(directory), _manager(directory, max_to_keep=max_to_keep) as m:
        if int(step) in m.all_steps():  # orbax would skip the save without a word
            raise LoraError(
                f"step {int(step)} is already saved in {os.fspath(directory)!r}; "
                "save under a new step number (or delete that step's folder)"
            )
        m.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(meta),
                structure=ocp.args.JsonSave(_leaves(state)),
            ),
        )
        m.wait_until_finished()


def _leaves(tree: Any) -> list:
    """``[path, shape, dtype]`` of each leaf: what ``restore_checkpoint`` compares ``like``
    with before orbax reads anything."""
    return [
        [jax.tree_util.keystr(kp), list(np.shape(x)), str(np.dtype(x.dtype))]
        for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _check_like(saved: list, like: Any, directory: str | os.PathLike, step: int) -> None:
    """The first leaf where ``like`` differs from the saved state, as a LoraError."""
    mine = _leaves(like)
    for i, (a, b) in enumerate(
        zip(saved + [None] * len(mine), mine + [None] * len(saved), strict=True)
    ):
        if a == b or (a and b and a[:2] == b[:2]):  # another dtype: orbax casts to like's
            continue
        if a is None or b is None or a[0] != b[0]:

            def show(x: tuple | None) -> Any:
                return "nothing" if x is None else x[0]

            what = f"the checkpoint has {show(a)} where like has {show(b)}"
        else:
            what = f"{a[0]} has shape {a[1]} in the checkpoint but {b[1]} in like"
        raise LoraError(
            f"step {step} in {os.fspath(directory)!r} was saved with another "
            f"structure than like ({len(saved)} leaves against {len(mine)}): at "
            f"leaf {i}, {what}; pass as like a state built the way it was saved "
            "(the same optimizer and adapter settings)"
        )


def restore_checkpoint(
    directory: str | os.PathLike, like: Any, step: int | None = None
) -> tuple[Any, dict]:
    """Restore ``(state, meta)`` saved by :func:`save_checkpoint` (latest step by default).

    Args:
      directory: checkpoint root.
      like: a pytree with the structure, shapes and dtypes of the saved state
        (e.g. a freshly initialised adapter and optimizer state).
      step: which step; ``None`` means the latest complete one.

    Returns:
      ``(state, meta)``: the restored state and ``{"step": ..., "data_position": ...}``.

    Raises:
      LoraError: no complete checkpoint in ``directory``, a damaged one, or a ``like``
        whose structure, shapes or dtypes differ from the saved state (naming the first
        leaf that does).

    Examples:
      See :func:`save_checkpoint`'s.
    """
    with _reading(directory, "training checkpoint"), _manager(directory, write=False) as m:
        step = _latest(m, directory, "save_checkpoint") if step is None else step
        with _quiet():  # orbax warns of each item the metadata call does not restore
            items = m.item_metadata(step)
        if "structure" in items.keys():  # noqa: SIM118 (orbax metadata; older checkpoints lack it)
            saved = m.restore(step, args=ocp.args.Composite(structure=ocp.args.JsonRestore()))
            _check_like(saved["structure"], like, directory, step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = m.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
    return out["state"], out["meta"]
