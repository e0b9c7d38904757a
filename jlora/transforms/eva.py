"""``init_eva``: EVA (Explained Variance Adaptation; PEFT's ``init_lora_weights="eva"``).

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

import jax
import jax.numpy as jnp
import numpy as np

from jlora.adapter import LayersNode, LoraNode, match
from jlora.config import LoraConfig, LoraError, changes_base
from jlora.interpret.capture import Capture
from jlora.interpret.core import Ctx
from jlora.targets import Adapter, Params, flatten, path_str
from jlora.transforms.apply import interpret_call
from jlora.transforms.init import init


def init_eva(  # noqa: PLR0913 (a public signature: keyword options)
    key,
    params: Params,
    cfg: LoraConfig,
    fn,
    batches,
    *,
    masks=None,
    rho: float = 2.0,
    whiten: bool = False,
    adjust_scaling: bool = True,
) -> Adapter:
    """An adapter whose ``A`` factors are the principal directions of each target's inputs.

    Args:
      key: a ``jax.random`` key (for targets no captured input reached).
      params: the base (not modified).
      cfg: what to adapt; ``cfg.init`` must not change the base.
      fn: ``fn(params, *args)``, the model; its dots with each target supply the inputs.
      batches: a non-empty list of argument tuples for ``fn`` (an array is one argument).
      masks: optional list (one per batch) of bool arrays shaped like the inputs' rows,
        e.g. ``(batch, seq)``: False rows (padding, prompt tokens) are left out, as
        PEFT's attention/label masks do.
      rho: each leaf may take up to ``round(rho * r)`` components (PEFT's ``rho`` >= 1;
        1.0: no redistribution).
      whiten: divide each component by the square root of its singular value (PEFT's).
      adjust_scaling: a leaf that ends with rank ``k != r`` gets ``alpha * k / r``, so
        its scaling ``alpha / r`` is unchanged (PEFT's ``adjust_scaling_factors``).

    Returns:
      The adapter; a leaf whose rank comes out 0 is not adapted (``None``), as in PEFT.
      Targets no captured input reached (used other than by ``dot_general``, or inside
      a ``cond``/``while``) keep ``cfg.init``'s factors, with a warning, as in PEFT.

    Raises:
      LoraError: bad ``rho``/``batches``, an input with fewer rows than components, a
        scanned ``(layers, in, out)`` leaf whose layers would get different ranks.

    Examples:
      >>> params = {"q": jnp.ones((4, 3))}
      >>> x = jax.random.normal(jax.random.key(1), (64, 4)) * jnp.array([[5.0, 0.1, 0.1, 0.1]])
      >>> cfg = jlora.LoraConfig(rank=1, targets="q")
      >>> ad = jlora.init_eva(jax.random.key(0), params, cfg, lambda p, x: x @ p["q"], [x])
      >>> jnp.abs(ad["q"].a[:, 0]).round(1).tolist()  # the inputs' main direction
      [1.0, 0.0, 0.0, 0.0]
    """
    cfg = dataclasses.replace(cfg, init="kaiming") if cfg.init == "eva" else cfg
    if changes_base(cfg.init):
        raise LoraError(
            f"init_eva computes its own factors; cfg.init={cfg.init!r} would also "
            "change the base: use init='kaiming' or 'gaussian'"
        )
    if not rho >= 1.0:
        raise LoraError(f"init_eva(rho={rho!r}): rho must be >= 1 (PEFT's EvaConfig)")
    if not isinstance(batches, (list, tuple)) or not batches:
        raise LoraError("init_eva(batches=...) must be a non-empty list of argument tuples")
    batches = [b if isinstance(b, tuple) else (b,) for b in batches]
    masks = [None] * len(batches) if masks is None else list(masks)
    if len(masks) != len(batches):
        raise LoraError(f"init_eva: {len(masks)} masks for {len(batches)} batches")
    adapter = init(key, params, cfg, fn, *batches[0])
    stats = _collect(fn, params, adapter, batches, masks)
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
            "embedding, a conv, or a cond/while body); they keep cfg.init's factors",
            stacklevel=2,
        )
    return jax.tree_util.tree_unflatten(
        treedef,
        [
            n if p not in pcas else _node(n, pcas[p], ranks[p], p, whiten, adjust_scaling)
            for p, n in nodes.items()
        ],
    )


def _collect(fn, params, adapter, batches, masks) -> dict:
    """Per adapted path: ``(count, sum, gram)`` over all batches, in float64."""

    def stats(params, adapter, mask, *args):
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


def _pca(stat, max_k: int, path: str):
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


def _node(node, pca, ranks, path: str, whiten: bool, adjust: bool):
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
