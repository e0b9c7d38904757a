"""Beside the factors: leaves trained in full (PEFT's ``modules_to_save``) and trained rows
of embedding tables (PEFT's ``trainable_token_indices``).

Both reach the interpreter as what it already knows: a full leaf replaces the base leaf,
and token rows become a LoRA node of rank ``k`` whose ``A`` is the fixed one-hot
``(vocab, k)`` of the chosen ids and whose ``B`` is ``rows - W0[ids]``, so every use of
the table (a lookup, a tied ``x @ E.T``) stays factored and the gradient is ``(k, d)``.
Likewise a node on some layers of a scanned stack (``LayersNode``) becomes a node on
all of them, zero elsewhere, with the adapted layers marked (:func:`active`) so a
``scan`` skips the low-rank work of the others.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jlora._src.adapter import FullNode, LayersNode, LoraNode, Node, StackedNode, TokenNode
from jlora._src.config import LoraError
from jlora._src.interpret import sym as sy
from jlora._src.numerics import qview as qv
from jlora._src.qnode import is_quantized
from jlora._src.targets import Leaf


def make(path: str, leaf: Leaf, indices: tuple[int, ...] | None) -> FullNode | TokenNode:
    """The node for a leaf that ``select_whole`` chose (``indices`` None: trained in full)."""
    if is_quantized(leaf):
        raise LoraError(
            f"{path!r} is {leaf.qtype.upper()}-quantized but modules_to_save / "
            "trainable_token_indices train it in float; leave it out of "
            "jlora.quantize's targets"
        )
    if indices is None:  # a copy: donating the adapter must not free the caller's base
        return FullNode(weight=jnp.array(leaf, copy=True))
    rows = jnp.take(leaf, jnp.asarray(indices), axis=0)
    return TokenNode(rows=rows, indices=tuple(indices), shape=tuple(leaf.shape))


def lower(leaf: Leaf, node: Node, exact: bool = True) -> tuple[Leaf, LoraNode | StackedNode | None]:
    """``(leaf, node)`` as the interpreter takes them: a full leaf in place of the base,
    token rows as a rank-``k`` LoRA node with a constant one-hot ``A``. ``exact=False``
    (``apply``, whose ``from_node`` sets ``g = 1`` on the layers ``active`` leaves out):
    a DoRA ``LayersNode``'s other layers get magnitude 1, not their base norm."""
    if isinstance(node, FullNode):
        return node.weight, None
    if isinstance(node, LayersNode):
        return leaf, _padded(leaf, node, exact)
    if not isinstance(node, TokenNode):
        return leaf, node
    k, vocab, rest = len(node.indices), node.shape[0], node.shape[1:]
    ids = jnp.asarray(node.indices)
    a = jax.nn.one_hot(ids, vocab, dtype=node.rows.dtype).T
    base = jnp.take(leaf, ids, axis=0).astype(node.rows.dtype)
    b = (node.rows - base).reshape(k, math.prod(rest))
    axes = ((), (0,), tuple(range(1, len(node.shape))))
    return leaf, LoraNode.of(a, b, alpha=k, shape=node.shape, axes=axes)


def active(node: Node | None) -> tuple[bool, ...] | None:
    """For a ``LayersNode``: whether each layer of the stack is adapted."""
    if not isinstance(node, LayersNode):
        return None
    return tuple(i in node.layers for i in range(node.length))


def _padded(leaf: Leaf, node: LayersNode, exact: bool = True) -> LoraNode:
    """The node on every layer: zero factors on the others (and, with DoRA, the base's own
    norm as their magnitude, so those layers stay ``W0``; ones when not ``exact``)."""
    inner, ids = node.node, jnp.asarray(node.layers)

    def pad(f: jax.Array) -> jax.Array:
        return jnp.zeros((node.length, *f.shape[1:]), f.dtype).at[ids].set(f)

    full = dataclasses.replace(
        inner, a=pad(inner.a), b=pad(inner.b), magnitude=None, shape=node.shape
    )
    m = inner.magnitude
    if m is None:
        return full
    shape = (node.length, *m.shape[1:])
    other = sy.node_norm(qv.wrap(leaf), full).reshape(shape) if exact else jnp.ones(shape)
    return dataclasses.replace(full, magnitude=other.astype(m.dtype).at[ids].set(m))


def merged(leaf: jax.Array, node: FullNode | TokenNode) -> jax.Array:
    """The leaf with the node written in: exactly the trained values."""
    if isinstance(node, FullNode):
        return node.weight
    return jnp.asarray(leaf).at[jnp.asarray(node.indices)].set(node.rows.astype(leaf.dtype))
