"""Exact-resume training state (adapter, optimizer state, data position) in orbax.

Each save is a numbered step folder written through the same ``CheckpointManager`` as
adapters (``jlora.io.checkpoint``): complete or absent, never half written.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from jlora.config import LoraError
from jlora.io.checkpoint import _latest, _manager, _reading, _writing


def save_checkpoint(directory, step: int, state, *, data_position=None,
                    max_to_keep: int | None = 3) -> None:
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
            raise LoraError(f"step {int(step)} is already saved in {os.fspath(directory)!r}; "
                            "save under a new step number (or delete that step's folder)")
        m.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)))
        m.wait_until_finished()


def restore_checkpoint(directory, like, step: int | None = None):
    """Restore ``(state, meta)`` saved by :func:`save_checkpoint` (latest step by default).

    Args:
      directory: checkpoint root.
      like: a pytree with the structure, shapes and dtypes of the saved state
        (e.g. a freshly initialised adapter and optimizer state).
      step: which step; ``None`` means the latest complete one.

    Returns:
      ``(state, meta)``: the restored state and ``{"step": ..., "data_position": ...}``.

    Raises:
      LoraError: no complete checkpoint in ``directory``, or a damaged one.

    Examples:
      See :func:`save_checkpoint`'s.
    """
    with _reading(directory, "training checkpoint"), _manager(directory, write=False) as m:
        step = _latest(m, directory, "save_checkpoint") if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                      meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]
