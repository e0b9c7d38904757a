"""Optimizers for adapters: LoRA+ as an optax ``multi_transform`` over path labels."""

from __future__ import annotations

import re
from typing import Callable

import jax
import optax

from jlora.targets import path_str

#: Labels of the LoRA+ parameter groups (PEFT's ``create_loraplus_optimizer``).
A, B, EMBEDDING = "a", "b", "embedding"


def labels(adapter, embedding_pattern: str = r"embed"):
    """The LoRA+ group of every trainable leaf, as a tree like ``adapter``.

    PEFT's grouping: ``b`` factors, DoRA magnitudes (also when stacked) and
    every 1-D leaf (biases) are group ``"b"``; factors of a leaf whose path matches
    ``embedding_pattern`` are ``"embedding"``; everything else is ``"a"``. Leaves trained
    in full (``modules_to_save``) and token rows are ``"a"``, whatever their shape: PEFT
    puts their 1-D parameters (biases, norm scales) with B at 16x the rate, which is
    LoRA+'s rule for B factors, not a choice made for them.
    """
    def label(kp, leaf):
        path = path_str(kp)
        if path.split("/")[-1] in ("weight", "rows"):  # FullNode / TokenNode: A's rate
            return A
        if re.search(embedding_pattern, path):
            return EMBEDDING
        return B if path.split("/")[-1] in ("b", "magnitude") or leaf.ndim <= 1 else A
    return jax.tree_util.tree_map_with_path(label, adapter)


def _times(learning_rate, ratio: float):
    if callable(learning_rate):
        return lambda step: ratio * learning_rate(step)
    return ratio * learning_rate


def loraplus(make_tx: Callable[..., optax.GradientTransformation], learning_rate,
             ratio: float = 16.0, embedding_lr=1e-6, embedding_pattern: str = r"embed",
             **tx_kwargs) -> optax.GradientTransformation:
    """LoRA+: the same optimizer with ``ratio x`` the learning rate on B.

    Args:
      make_tx: an optax factory taking ``learning_rate`` first, e.g. ``optax.adamw``.
      learning_rate: A's learning rate, a float or an optax schedule (B gets the
        schedule times ``ratio``).
      ratio: B's learning rate over A's (16 in the source article and LoRA+ paper).
      embedding_lr: learning rate of embedding adapters (PEFT's
        ``loraplus_lr_embedding``, default 1e-6).
      embedding_pattern: regex on the adapter path that marks embedding adapters.
      **tx_kwargs: passed to every ``make_tx`` call (e.g. ``weight_decay``).

    Returns:
      An ``optax.multi_transform``; its state holds only the adapter's arrays.

    Raises:
      ValueError: a ratio that is not positive.

    Examples:
      >>> params = {"q_proj": jnp.ones((2, 2))}
      >>> ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=1, targets="q_proj"))
      >>> tx = jlora.loraplus(optax.sgd, learning_rate=0.1)
      >>> upd, _ = tx.update(jax.tree.map(jnp.ones_like, ad), tx.init(ad))
      >>> [round(float(upd["q_proj"].a[0, 0]), 6), round(float(upd["q_proj"].b[0, 0]), 6)]
      [-0.1, -1.6]
    """
    if not ratio > 0:
        raise ValueError(f"ratio={ratio!r} must be positive (LoRA+ uses 16)")
    transforms = {A: make_tx(learning_rate, **tx_kwargs),
                  B: make_tx(_times(learning_rate, ratio), **tx_kwargs),
                  EMBEDDING: make_tx(embedding_lr, **tx_kwargs)}
    return optax.multi_transform(transforms, lambda tree: labels(tree, embedding_pattern))
