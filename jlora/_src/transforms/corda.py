"""CorDA (PEFT's ``init_lora_weights="corda"``): context-oriented decomposition.

Each target's inputs, every batch divided by its largest entry, give a covariance
``C`` (the mean over batches of ``X^T X``, gathered by the interpreter's capture mode
that EVA uses; one per layer of a scanned stack). The weight is decomposed as ``C``
sees it: the SVD of ``C' W`` (``C' = C + damp * mean(diag C) * I``, ``damp`` doubled
from 0.01 until ``C'`` inverts to within 0.05), ``C' W = P S Q^T``. IPM keeps the
first ``r`` components (what the data uses most: the adapter learns there), KPM the
last ``r`` (what it uses least: the rest, world knowledge, stays in the base).
``A = C'^-1 P_r sqrt(S_r / s)``, ``B = sqrt(S_r / s) Q_r^T`` and the base becomes
``W0 - s A B``. PEFT divides each module call's input by its largest entry; jlora
divides each batch's, the same with batches of one sequence, as PEFT's hook assumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.adapter import Adapter, LoraNode
from jlora._src.config import LoraError
from jlora._src.interpret.capture import Capture
from jlora._src.interpret.core import Ctx
from jlora._src.targets import Leaf, Params
from jlora._src.transforms import factor_inits
from jlora._src.transforms.apply import interpret_call


def covariances(fn: Callable, params: Params, adapter: Adapter, batches: list) -> dict:
    """Per adapted path: ``C`` ``(*stack, in, in)`` in float64."""

    def stats(params: Params, adapter: Adapter, *args: Any) -> dict:
        ctx = Ctx(capture=Capture())
        interpret_call(fn, params, adapter, (args, {}), ctx)
        return ctx.capture.stats

    run = jax.jit(stats)
    total: dict = {}
    for args in batches:
        for p, (_, _, gram, top) in run(params, adapter, *args).items():
            top = np.abs(np.asarray(top, np.float64))[..., None, None]
            c = np.asarray(gram, np.float64) / top**2
            total[p] = c if p not in total else total[p] + c
    return {p: c / len(batches) for p, c in total.items()}


def factors(
    node: LoraNode, leaf: Leaf, cov: np.ndarray | None, method: str, path: str
) -> tuple[LoraNode, jax.Array]:
    """The node's CorDA factors and the base ``W0 - s A B``, each stacked matrix alone."""
    if cov is None:
        raise LoraError(
            f"init='corda' needs the inputs of {path!r}, but no dot_general with "
            "it received any (an embedding, a conv, a cond/while body); leave it "
            "out of the targets"
        )
    axes = (node.stack_axes, node.in_axes, node.out_axes)
    mat, back = factor_inits._matrices(leaf, axes)
    w = np.asarray(mat, np.float64)
    mats = w.reshape(-1, *w.shape[-2:])
    covs = np.asarray(cov).reshape(-1, *cov.shape[-2:])
    r = node.rank
    out = [_one(m, c, r, node.scale, method) for m, c in zip(mats, covs, strict=True)]
    a = np.stack([o[0] for o in out]).reshape((*w.shape[:-1], r))
    b = np.stack([o[1] for o in out]).reshape((*w.shape[:-2], r, w.shape[-1]))
    base = back(jnp.asarray(w - node.scale * a @ b, jnp.float32))
    return (
        dataclasses.replace(node, a=jnp.asarray(a, node.a.dtype), b=jnp.asarray(b, node.b.dtype)),
        base.astype(leaf.dtype),
    )


def _one(
    w: np.ndarray, cov: np.ndarray, r: int, scale: float, method: str
) -> tuple[np.ndarray, np.ndarray]:
    damp, eye = 0.01, np.eye(cov.shape[0])
    while True:  # PEFT's: more damping until the inverse is good to 0.05
        fix = cov + eye * np.mean(np.diag(cov)) * damp
        inv = np.linalg.inv(fix)
        if np.linalg.norm(fix @ inv - eye) < 0.05:
            break
        damp *= 2
    p, s, qt = np.linalg.svd(fix @ w, full_matrices=False)
    keep = slice(0, r) if method == "ipm" else slice(len(s) - r, len(s))
    root = np.sqrt(s[keep] / scale)
    return inv @ p[:, keep] * root, root[:, None] * qt[keep]
