"""Optimizers for adapters, as optax transformations: LoRA+ (a ``multi_transform`` over
path labels), LoRA-FA and Riemannian preconditioning (each LoRA node's ``r x r``
preconditioners from its current factors)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import KeyPath

from jlora._src.adapter import Adapter, LoraNode, StackedNode, is_lora
from jlora._src.targets import Params, path_str

#: Labels of the LoRA+ parameter groups (PEFT's ``create_loraplus_optimizer``).
A, B, EMBEDDING = "a", "b", "embedding"


def labels(adapter: Adapter, embedding_pattern: str = r"embed") -> Adapter:
    """The LoRA+ group of every trainable leaf, as a tree like ``adapter``.

    PEFT's grouping: ``b`` factors, DoRA magnitudes (also when stacked) and
    every 1-D leaf (biases) are group ``"b"``; factors of a leaf whose path matches
    ``embedding_pattern`` are ``"embedding"``; everything else is ``"a"``. Leaves trained
    in full (``modules_to_save``) and token rows are ``"a"``, whatever their shape: PEFT
    puts their 1-D parameters (biases, norm scales) with B at 16x the rate, which is
    LoRA+'s rule for B factors, not a choice made for them.
    """

    def label(kp: KeyPath, leaf: jax.Array) -> str:
        path = path_str(kp)
        if path.split("/")[-1] in ("weight", "rows"):  # FullNode / TokenNode: A's rate
            return A
        if re.search(embedding_pattern, path):
            return EMBEDDING
        return B if path.split("/")[-1] in ("b", "magnitude") or leaf.ndim <= 1 else A

    return jax.tree_util.tree_map_with_path(label, adapter)


def _times(learning_rate: float | optax.Schedule, ratio: float) -> float | optax.Schedule:
    if callable(learning_rate):
        return lambda step: ratio * learning_rate(step)
    return ratio * learning_rate


def loraplus(
    make_tx: Callable[..., optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    ratio: float = 16.0,
    embedding_lr: float | optax.Schedule = 1e-6,
    embedding_pattern: str = r"embed",
    **tx_kwargs: Any,
) -> optax.GradientTransformation:
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
    transforms = {
        A: make_tx(learning_rate, **tx_kwargs),
        B: make_tx(_times(learning_rate, ratio), **tx_kwargs),
        EMBEDDING: make_tx(embedding_lr, **tx_kwargs),
    }
    return optax.multi_transform(transforms, lambda tree: labels(tree, embedding_pattern))


def _gram(f: jax.Array, axis_r_last: bool) -> jax.Array:
    """``f^T f`` (``a (.., in, r)``: rank last) or ``f f^T`` (``b (.., r, out)``), float32."""
    f = f.astype(jnp.float32)
    return jnp.swapaxes(f, -1, -2) @ f if axis_r_last else f @ jnp.swapaxes(f, -1, -2)


def _damped_solve(gram: jax.Array, g: jax.Array, delta: float, left: bool) -> jax.Array:
    """``(gram + delta I)^-1 g`` (``left``) or ``g (gram + delta I)^-1``, in g's dtype."""
    m = gram + delta * jnp.broadcast_to(jnp.eye(gram.shape[-1], dtype=gram.dtype), gram.shape)
    g32 = g.astype(jnp.float32)
    out = (
        jnp.linalg.solve(m, g32)
        if left
        else jnp.swapaxes(jnp.linalg.solve(m, jnp.swapaxes(g32, -1, -2)), -1, -2)
    )
    return out.astype(g.dtype)


def _preconditioner(name: str, fn: Callable) -> optax.GradientTransformationExtraArgs:
    """Rewrite each LoRA node's gradients with ``fn(update_node, param_node)``."""

    def update(
        updates: Adapter, state: optax.OptState, params: Params = None, **extra: Any
    ) -> tuple[Adapter, optax.OptState]:
        if params is None:
            raise ValueError(
                f"{name} preconditions with the current factors: call "
                "tx.update(grads, state, params)"
            )
        return jax.tree.map(
            lambda u, p: fn(u, p) if is_lora(p) and u is not None else u,
            updates,
            params,
            is_leaf=is_lora,
        ), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def _scales(node: LoraNode | StackedNode) -> jax.Array:
    s = jnp.asarray(node.scale, jnp.float32)
    return s.reshape((-1,) + (1,) * (node.b.ndim - 1)) if s.ndim else s


def lorafa(
    make_tx: Callable[..., optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    delta: float = 1e-8,
    **tx_kwargs: Any,
) -> optax.GradientTransformation:
    """LoRA-FA (PEFT's ``create_lorafa_optimizer``): A frozen at its init, B trained on
    its gradient projected as full fine-tuning's would be, ``(A^T A + delta I)^-1 g_B / s^2``
    (``s`` each node's scaling).

    A gets no update and holds no optimizer state; every other leaf (B, DoRA
    magnitudes, fully trained leaves) is updated by ``make_tx``. LoRA-FA's memory
    saving also needs the gradient of B alone: differentiate with A held constant.

    Args:
      make_tx: an optax factory taking ``learning_rate`` first, e.g. ``optax.adamw``.
      learning_rate: a float or an optax schedule.
      delta: damping added to ``A^T A``'s diagonal (PEFT's 1e-8).
      **tx_kwargs: passed to ``make_tx`` (e.g. ``weight_decay``).

    Returns:
      An optax transformation; ``update`` needs ``params`` (the adapter).

    Raises:
      ValueError: (from ``update``) called without ``params``.

    Examples:
      >>> params = {"q": jnp.ones((4, 3))}
      >>> ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets="q"))
      >>> tx = jlora.lorafa(optax.sgd, 0.1)
      >>> upd, _ = tx.update(jax.tree.map(jnp.ones_like, ad), tx.init(ad), ad)
      >>> float(jnp.abs(upd["q"].a).max()), upd["q"].b.shape
      (0.0, (2, 3))
    """

    def project(u: LoraNode, p: LoraNode) -> LoraNode:
        b = _damped_solve(_gram(p.a, True), u.b, delta, left=True) / _scales(p) ** 2
        return dataclasses.replace(u, b=b.astype(u.b.dtype))

    def frozen(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda kp, _: "frozen" if path_str(kp).split("/")[-1] == "a" else "train", tree
        )

    return optax.chain(
        _preconditioner("lorafa", project),
        optax.multi_transform(
            {"frozen": optax.set_to_zero(), "train": make_tx(learning_rate, **tx_kwargs)}, frozen
        ),
    )


def riemannian(
    make_tx: Callable[..., optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    delta: float = 1e-2,
    **tx_kwargs: Any,
) -> optax.GradientTransformation:
    """Riemannian preconditioned LoRA (PEFT's ``create_riemannian_optimizer``): A's
    gradient times ``(B B^T + delta I)^-1``, B's by ``(A^T A + delta I)^-1``, then
    ``make_tx``.

    In jlora's layout (``a (in, r)``, ``b (r, out)``), both ``r x r``; stacked nodes
    (scanned layers, ``jlora.stack``) are preconditioned per matrix. Other leaves (DoRA
    magnitudes, fully trained leaves) pass to ``make_tx`` unchanged, as in PEFT.

    Args:
      make_tx: an optax factory taking ``learning_rate`` first, e.g. ``optax.adamw``.
      learning_rate: a float or an optax schedule.
      delta: damping added to each ``r x r`` matrix's diagonal (PEFT's ``reg``, 1e-2).
      **tx_kwargs: passed to ``make_tx``.

    Returns:
      An optax transformation; ``update`` needs ``params`` (the adapter).

    Raises:
      ValueError: (from ``update``) called without ``params``.

    Examples:
      >>> params = {"q": jnp.ones((4, 3))}
      >>> ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets="q"))
      >>> tx = jlora.riemannian(optax.sgd, 0.1)
      >>> upd, _ = tx.update(jax.tree.map(jnp.ones_like, ad), tx.init(ad), ad)
      >>> round(float(upd["q"].a[0, 0]), 1)  # B is zero: A's gradient over delta
      -10.0
    """

    def precondition(u: LoraNode, p: LoraNode) -> LoraNode:
        a = _damped_solve(_gram(p.b, False), u.a, delta, left=False)
        b = _damped_solve(_gram(p.a, True), u.b, delta, left=True)
        return dataclasses.replace(u, a=a, b=b)

    return optax.chain(
        _preconditioner("riemannian", precondition), make_tx(learning_rate, **tx_kwargs)
    )
