"""EVA (Explained Variance Adaptation; PEFT's ``init_lora_weights="eva"``).

Each target's ``A`` holds the top principal directions of the inputs that reach
it on batches the caller supplies (``B`` is zero, so the model is unchanged), and
the ranks are redistributed by explained variance: every (leaf, layer) may take up
to ``round(rho * r)`` components, and the ``sum r`` components with the largest
explained-variance ratios across all of them win (PEFT's ``_get_rank_distribution``;
ties go to the earlier leaf). PEFT runs an incremental, randomized PCA until the
components stop moving (``tau``); jlora accumulates each input's mean and Gram matrix
over all batches and takes the exact PCA of them, so there is no ``tau``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jlora._src.adapter import Adapter, LayersNode, LoraNode, match
from jlora._src.config import LoraConfig, LoraError
from jlora._src.interpret.capture import Capture
from jlora._src.interpret.core import Ctx
from jlora._src.targets import Params, flatten, path_str
from jlora._src.transforms.apply import interpret_call
from jlora._src.transforms.init import init


def eva_adapter(  # noqa: PLR0913 (EVA's options, as init_eva takes them)
    key: jax.Array,
    params: Params,
    cfg: LoraConfig,
    fn: Callable,
    batches: list[tuple],
    *,
    masks: Sequence[ArrayLike] | None = None,
    rho: float = 2.0,
    whiten: bool = False,
    adjust_scaling: bool = True,
) -> Adapter:
    """EVA's adapter (``jlora.init_eva`` says what each argument is).

    ``cfg.init`` is the plain init (``"kaiming"``) whose factors the targets that no
    captured input reached keep; ``batches`` are argument tuples, checked non-empty.
    """
    if not rho >= 1.0:
        raise LoraError(f"init_eva(rho={rho!r}): rho must be >= 1 (PEFT's EvaConfig)")
    rows: list[ArrayLike | None] = [None] * len(batches) if masks is None else list(masks)
    if len(rows) != len(batches):
        raise LoraError(f"init_eva: {len(rows)} masks for {len(batches)} batches")
    adapter = init(key, params, cfg, fn, *batches[0])
    stats = _collect(fn, params, adapter, batches, rows)
    flat, treedef = flatten(params)
    paths = [path_str(kp) for kp, _ in flat]
    nodes = dict(zip(paths, match(params, adapter), strict=True))
    some = [p for p, n in nodes.items() if isinstance(n, LayersNode)]
    if some:
        raise LoraError(
            f"init_eva with layers_to_transform on a scanned stack ({some[0]!r}) "
            "is not supported yet; adapt all its layers or use an unscanned model"
        )
    lora = {p: n for p, n in nodes.items() if isinstance(n, LoraNode)}
    pcas = {p: _pca(stats[p], round(rho * n.rank), p) for p, n in lora.items() if p in stats}
    ranks = _distribute(pcas, {p: lora[p].rank for p in pcas})
    missing = [p for p in lora if p not in pcas]
    if missing:
        warnings.warn(
            f"init_eva: no input reached {missing} through dot_general (an "
            "embedding, a conv, or a cond/while body); they keep kaiming factors, as in PEFT",
            stacklevel=2,
        )
    return jax.tree_util.tree_unflatten(
        treedef,
        [
            n if p not in pcas else _node(n, pcas[p], ranks[p], p, whiten, adjust_scaling)
            for p, n in nodes.items()
        ],
    )


def _collect(fn: Callable, params: Params, adapter: Adapter, batches: list, masks: list) -> dict:
    """Per adapted path: ``(count, sum, gram)`` over all batches, in float64."""

    def stats(params: Params, adapter: Adapter, mask: ArrayLike | None, *args: Any) -> dict:
        ctx = Ctx(capture=Capture(mask))
        interpret_call(fn, params, adapter, (args, {}), ctx)
        return ctx.capture.stats

    run = jax.jit(stats)
    total: dict = {}
    for args, mask in zip(batches, masks, strict=True):
        got = run(params, adapter, None if mask is None else jnp.asarray(mask, bool), *args)
        for p, vals in got.items():
            vals = [np.asarray(v, np.float64) for v in vals]
            total[p] = (
                vals if p not in total else [t + v for t, v in zip(total[p], vals, strict=True)]
            )
    return total


def _pca(stat: tuple, max_k: int, path: str) -> list[np.ndarray]:
    """Per layer: ``(ratios (k,), components (K, k), singular values (k,))``, stacked."""
    count, total, gram = stat[:3]
    stack = count.shape
    count, total = count.reshape(-1), total.reshape(count.size, -1)
    gram = gram.reshape(count.size, *gram.shape[-2:])
    k = min(max_k, gram.shape[-1])
    if count.min() < k:
        raise LoraError(
            f"init_eva: {path!r} saw {int(count.min())} rows, fewer than the "
            f"{k} components it may take; give more batches (or tokens)"
        )
    out = []
    for n, s, g in zip(count, total, gram, strict=True):
        mean = s / n
        centered = g - n * np.outer(mean, mean)
        lam, vec = np.linalg.eigh(centered)
        lam, vec = np.clip(lam[::-1], 0.0, None), vec[:, ::-1]
        vec = vec * np.sign(vec[np.abs(vec).argmax(0), np.arange(vec.shape[1])])  # svd_flip
        out.append((lam[:k] / max(lam.sum(), 1e-30), vec[:, :k], np.sqrt(lam[:k])))
    return [np.stack(x).reshape(stack + x[0].shape) for x in zip(*out, strict=True)]


def _distribute(pcas: dict, budget: dict) -> dict:
    """Per path: the rank of each layer (PEFT's rule over every (leaf, layer) unit)."""
    units, values = [], []
    for p, (ratios, _, _) in pcas.items():
        for layer, r in enumerate(ratios.reshape(-1, ratios.shape[-1])):
            units += [(p, layer)] * len(r)
            values += list(r)
    total = sum(budget[p] * (pcas[p][0].size // pcas[p][0].shape[-1]) for p in pcas)
    won = np.argsort(-np.asarray(values), kind="stable")[:total]
    counts = {(p, layer): 0 for p, layer in units}
    for i in won:
        counts[units[i]] += 1
    return {
        p: np.array([counts[(p, layer)] for layer in range(r.size // r.shape[-1])])
        for p, (r, _, _) in pcas.items()
    }


def _node(
    node: LoraNode, pca: list[np.ndarray], ranks: np.ndarray, path: str, whiten: bool, adjust: bool
) -> LoraNode | None:
    if len(set(ranks.tolist())) > 1:
        raise LoraError(
            f"init_eva gives the layers of {path!r} different ranks "
            f"({sorted(set(ranks.tolist()))}), but one (layers, in, out) leaf has "
            "one rank: pass rho=1.0 (no redistribution) or use an unscanned model"
        )
    k = int(ranks[0])
    if k == 0:
        return None
    _, comps, svals = pca
    a = comps[..., :k] / (np.sqrt(svals[..., None, :k]) if whiten else 1.0)
    alpha = node.alpha * k / node.rank if adjust and k != node.rank else node.alpha
    dtype = node.a.dtype
    return dataclasses.replace(
        node,
        a=jnp.asarray(a, dtype),
        b=jnp.zeros((*node.b.shape[:-2], k, node.b.shape[-1]), dtype),
        rank=k,
        alpha=float(alpha),
    )
