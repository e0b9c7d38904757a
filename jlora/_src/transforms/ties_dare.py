"""PEFT's task-arithmetic merges of LoRA adapters: TIES, DARE, magnitude pruning.

Each method is PEFT's (``peft.utils.merge_utils``, used by ``add_weighted_adapter``):

- ``magnitude_prune``: keep the ``density`` fraction of largest-magnitude entries of each
  task tensor, then the weighted sum;
- ``ties``: the same pruning, a majority sign per entry from the pruned (unweighted)
  tensors (``"total"``: the sign of their sum; ``"frequency"``: of their signs' sum),
  then the weighted entries that agree with it, averaged over how many agree;
- ``dare_linear`` / ``dare_ties``: random pruning (keep each entry with probability
  ``density``, rescale by ``1/density``), then the weighted sum / TIES' sign election.

Without ``_svd`` the task tensors are the factors themselves (all adapters of one rank),
``A``'s weighted by ``sign(w s) sqrt(|w s|)`` and ``B``'s by ``sqrt(|w s|)``, as PEFT
does; with ``_svd`` they are the full deltas ``s A B`` weighted by ``w``, and the result
is the best rank-``rank`` factorization of the merged delta. Pruning and sign election
work per layer of a stacked node, as PEFT's per module. The random masks of DARE are
``jax.random.bernoulli(fold_in(fold_in(fold_in(key, leaf), adapter), part), density)``
with ``leaf`` the node's index among the adapter's nodes (path order), ``adapter`` its
index in ``adapters`` and ``part`` 0 for ``A`` (or the delta), 1 for ``B``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jlora._src.adapter import LoraNode
from jlora._src.config import LoraError

BASE = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = BASE + tuple(m + "_svd" for m in BASE)
SIGNS = ("total", "frequency")


def check(
    method: str, density: float | None, majority_sign_method: str, key: jax.Array | None
) -> None:
    """The method's arguments, each a LoraError naming the fix."""
    if density is None or not 0.0 < float(density) <= 1.0:
        raise LoraError(
            f"method={method!r} needs density in (0, 1] (the fraction of entries "
            f"kept), got {density!r}"
        )
    if majority_sign_method not in SIGNS:
        raise LoraError(f"majority_sign_method={majority_sign_method!r} is not one of {SIGNS}")
    if method.startswith("dare") and key is None:
        raise LoraError(f"method={method!r} prunes at random: pass key=jax.random.key(...)")


def combine(
    path: str,
    parts: list[tuple[float, LoraNode]],
    method: str,
    rank: int | None,
    density: float | None,
    sign: str,
    key: jax.Array | None,
) -> LoraNode:
    """One node from ``parts`` (``[(weight, node)]``) by ``method`` (see the module doc)."""
    first = parts[0][1]
    base = method.removesuffix("_svd")
    keys = [None if key is None else jax.random.fold_in(key, i) for i in range(len(parts))]
    if method.endswith("_svd"):
        deltas = [
            n.scale * jnp.matmul(n.a.astype(jnp.float32), n.b.astype(jnp.float32)) for _, n in parts
        ]
        delta = _merge(base, deltas, [w for w, _ in parts], density, sign, keys, 0)
        u, s, vh = jnp.linalg.svd(delta, full_matrices=False)
        k = min(rank or max(n.rank for _, n in parts), s.shape[-1])
        a, b = u[..., :, :k], s[..., :k, None] * vh[..., :k, :]
    else:
        if len({n.rank for _, n in parts}) != 1:
            raise LoraError(
                f"{path!r}: method={method!r} merges the factors entry by entry, so "
                f"the adapters need one rank (got {[n.rank for _, n in parts]}); "
                f"use {method + '_svd'!r} or 'cat'"
            )
        ws = [w * n.scale for w, n in parts]
        a = _merge(
            base,
            [n.a for _, n in parts],
            [math.copysign(math.sqrt(abs(w)), w) for w in ws],
            density,
            sign,
            keys,
            0,
        )
        b = _merge(
            base, [n.b for _, n in parts], [math.sqrt(abs(w)) for w in ws], density, sign, keys, 1
        )
    r = a.shape[-1]
    return dataclasses.replace(
        first,
        a=a.astype(first.a.dtype),
        b=b.astype(first.b.dtype),
        rank=r,
        alpha=float(r),
        rslora=False,
    )


def _merge(
    method: str,
    tensors: list[jax.Array],
    weights: list[float],
    density: float | None,
    sign: str,
    keys: list,
    part: int,
) -> jax.Array:
    """PEFT's ``magnitude_prune``/``ties``/``dare_linear``/``dare_ties`` of ``tensors``
    (``(*stack, m, n)`` each; pruning per stacked matrix)."""
    assert density is not None  # (check refuses these methods without one)
    if method in ("ties", "magnitude_prune"):
        pruned = [_top_k(t, density) for t in tensors]
    else:
        pruned = [
            jnp.where(
                jax.random.bernoulli(jax.random.fold_in(k, part), density, t.shape),
                t / density,
                jnp.zeros((), t.dtype),
            )
            for t, k in zip(tensors, keys, strict=True)
        ]
    stacked = jnp.stack(pruned)
    weighted = stacked * jnp.asarray(weights, stacked.dtype).reshape(
        (-1,) + (1,) * (stacked.ndim - 1)
    )
    if method in ("magnitude_prune", "dare_linear"):
        return weighted.sum(0)
    votes = stacked if sign == "total" else jnp.sign(stacked)
    agree = jnp.sign(stacked) == jnp.where(votes.sum(0) >= 0, 1.0, -1.0)[None]
    return (weighted * agree).sum(0) / jnp.maximum(agree.sum(0), 1).astype(weighted.dtype)


def _top_k(t: jax.Array, density: float) -> jax.Array:
    """``t`` with all but its ``int(density * m n)`` largest-magnitude entries zeroed, per
    matrix of its last two axes."""
    flat = t.reshape((*t.shape[:-2], -1))
    k = int(density * flat.shape[-1])
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    keep = jnp.zeros(flat.shape, bool)
    keep = jnp.put_along_axis(keep, idx, True, axis=-1, inplace=False)
    return jnp.where(keep, flat, jnp.zeros((), t.dtype)).reshape(t.shape)
