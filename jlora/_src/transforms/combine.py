"""``combine_adapters``: many adapters made into one, PEFT's ``add_weighted_adapter``.

``"cat"`` (ranks add), ``"linear"`` (one rank: factors weighted and summed), ``"svd"``
(the weighted sum of updates truncated to a rank) here, and the task-arithmetic
methods (TIES, DARE, magnitude pruning, and their ``_svd`` forms) beside it in
:mod:`jlora._src.transforms.ties_dare`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.adapter import Adapter, LoraNode, Node, rebuild, same_leaves
from jlora._src.config import LoraError
from jlora._src.transforms import ties_dare

COMBINE = ("cat", "linear", "svd", *ties_dare.METHODS)


def combine_adapters(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    key: jax.Array | None = None,
) -> Adapter:
    """One adapter whose delta is ``sum_i weights[i] * s_i * A_i @ B_i`` per leaf.

    Args:
      adapters: LoRA adapters of one base (a leaf may be adapted by only some).
      weights: one float per adapter.
      method: ``"cat"``: ranks concatenated, exact; A's kept, each weight and
        scaling folded into its B. ``"linear"``: the same exact delta with
        ``sqrt(|w_i| s_i)`` folded into both factors (balanced, as PEFT's
        ``linear`` but with no cross terms). ``"svd"``: the best rank-``rank``
        approximation of the weighted delta (Eckart-Young), computed from QR of
        the concatenated factors, never the full matrix.
        PEFT's ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and
        their ``_svd`` forms, as ``add_weighted_adapter`` computes them
        (:mod:`jlora._src.transforms.ties_dare`).
      rank: the rank for ``"svd"`` and the ``_svd`` forms (default: the largest
        source rank).
      density: the fraction of entries TIES/DARE/magnitude pruning keep.
      majority_sign_method: TIES' sign election, ``"total"`` or ``"frequency"``.
      key: the ``jax.random`` key of DARE's random pruning.

    Returns:
      An adapter with scaling 1 (``alpha == rank``): each source's scaling is
      applied exactly once, inside the factors.

    Raises:
      LoraError: an unknown method, a weight count that differs from the adapters',
        settings a method needs but lacks (``density``, ``key``), stacked or DoRA sources.

    Examples:
      >>> p = {"q": jnp.ones((4, 6))}
      >>> a1, a2 = (jlora.init(jax.random.key(i), p, jlora.LoraConfig(rank=2, targets=("q",)))
      ...           for i in range(2))
      >>> both = jlora.combine_adapters([a1, a2], [0.5, 0.5], method="cat")
      >>> both["q"].rank, both["q"].scale
      (4, 1.0)
    """
    adapters, weights = list(adapters), [float(w) for w in weights]
    if method not in COMBINE:
        raise LoraError(f"method={method!r} is not one of {COMBINE}")
    if len(adapters) != len(weights) or not adapters:
        raise LoraError(
            f"combine_adapters got {len(adapters)} adapters and {len(weights)} "
            "weights; give one weight per adapter"
        )
    if method in ties_dare.METHODS:
        ties_dare.check(method, density, majority_sign_method, key)
    found = same_leaves(adapters)
    combined = {}
    for j, p in enumerate(found[0]):
        parts = [(w, f[p]) for w, f in zip(weights, found, strict=True)]
        combined[p] = (
            _combine(p, parts, method, rank)
            if method not in ties_dare.METHODS
            else ties_dare.combine(
                p,
                _checked(p, parts),
                method,
                rank,
                density,
                majority_sign_method,
                None if key is None else jax.random.fold_in(key, j),
            )
        )
    return rebuild(adapters[0], combined)


def _checked(path: str, parts: list[tuple[float, Node]]) -> list[tuple[float, LoraNode]]:
    """``parts`` if all are plain LoRA/rsLoRA nodes of one layout."""
    checked = []
    for w, n in parts:
        if not isinstance(n, LoraNode) or n.magnitude is not None:
            raise LoraError(
                f"{path!r}: only plain LoRA/rsLoRA adapters combine (a DoRA "
                "magnitude, a module trained in full, token rows or a node on "
                "some layers of a stack does not add as low-rank factors; merge "
                "such adapters instead)"
            )
        checked.append((w, n))
    first = checked[0][1]
    for _, n in checked:
        if (n.shape, n.stack_axes, n.in_axes, n.out_axes) != (
            first.shape,
            first.stack_axes,
            first.in_axes,
            first.out_axes,
        ):
            raise LoraError(f"{path!r}: the adapters were made for different axes or shapes")
    return checked


def _combine(path: str, parts: list[tuple[float, Node]], method: str, rank: int | None) -> LoraNode:
    plain = _checked(path, parts)
    first = plain[0][1]
    if method == "cat":
        a_parts = [n.a for _, n in plain]
        b_parts = [(w * n.scale) * n.b for w, n in plain]
    else:

        def root(w: float, n: LoraNode) -> np.ndarray:
            return np.sqrt(abs(w) * n.scale)

        a_parts = [np.sign(w) * root(w, n) * n.a for w, n in plain]
        b_parts = [root(w, n) * n.b for w, n in plain]
    a, b = jnp.concatenate(a_parts, axis=-1), jnp.concatenate(b_parts, axis=-2)
    if method == "svd":
        a, b = _truncate(a, b, rank or max(n.rank for _, n in plain))
    r = a.shape[-1]
    return dataclasses.replace(first, a=a, b=b, rank=r, alpha=float(r), rslora=False)


def _truncate(a: jax.Array, b: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Factors of the best rank-``rank`` approximation of ``a @ b`` (batched over stacks)."""
    dtype = a.dtype
    qa, ra = jnp.linalg.qr(a.astype(jnp.float32))
    qb, rb = jnp.linalg.qr(jnp.swapaxes(b, -1, -2).astype(jnp.float32))
    u, s, vh = jnp.linalg.svd(ra @ jnp.swapaxes(rb, -1, -2), full_matrices=False)
    k = min(rank, s.shape[-1])
    root = jnp.sqrt(s[..., :k])
    new_a = (qa @ u[..., :, :k]) * root[..., None, :]
    new_b = root[..., :, None] * (vh[..., :k, :] @ jnp.swapaxes(qb, -1, -2))
    return new_a.astype(dtype), new_b.astype(dtype)
