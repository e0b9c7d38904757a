"""Inits that move part of each weight into the factors and return a changed base.

PiSSA (the top-r singular directions, by a full or a randomized SVD), OLoRA (PEFT's
``olora_init``: QR of the torch-layout weight) and LoftQ (alternating NF4 quantization
and a rank-r SVD of what quantization missed), each on every stacked ``(in, out)``
matrix in float32; and ``orthogonal`` (factors whose product is zero: the base stays).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jlora._src.config import LoraConfig, LoraError, niter
from jlora._src.numerics.quant import dequantize_array, quantize_array
from jlora._src.qnode import Quantized
from jlora._src.targets import Leaf


def base_changing(
    cfg: LoraConfig,
    w: Leaf,
    axes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    rank: int,
    scale: float,
    dtype: DTypeLike,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, Leaf]:
    """``(a, b, base)`` for ``cfg.init``: the factors and the base to train on."""
    if cfg.init == "loftq":
        return _loftq(w, axes, rank, scale, dtype, cfg.loftq_iter)
    k = niter(cfg.init)
    factors = (
        _FACTORS[cfg.init]
        if k is None
        else functools.partial(_pissa_niter, niter=k, key=jax.random.key(0) if key is None else key)
    )
    return _moved(w, axes, rank, scale, dtype, factors)


def fresh(
    init: str, key: jax.Array, path: str, sizes: tuple[tuple, int, int, int], dtype: DTypeLike
) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` of an init that leaves the base alone (B = 0 but for ``orthogonal``);
    every other init starts from kaiming's (a base-changing one then overwrites them, a
    data one computes its own where data reached). ``sizes``: ``(stack, in, out, rank)``."""
    return _FRESH.get(init, _kaiming)(key, path, *sizes, dtype)


def _kaiming(
    key: jax.Array, path: str, stack: tuple, n_in: int, n_out: int, rank: int, dtype: DTypeLike
) -> tuple[jax.Array, jax.Array]:
    """torch's ``kaiming_uniform_(a=sqrt(5))`` on ``(r, in)``: bound ``1/sqrt(in)``; B = 0."""
    bound = 1.0 / math.sqrt(n_in)
    a = jax.random.uniform(key, (*stack, n_in, rank), dtype, -bound, bound)
    return a, jnp.zeros((*stack, rank, n_out), dtype)


def _gaussian(
    key: jax.Array, path: str, stack: tuple, n_in: int, n_out: int, rank: int, dtype: DTypeLike
) -> tuple[jax.Array, jax.Array]:
    """A ~ N(0, 1/r^2); B = 0."""
    a = (jax.random.normal(key, (*stack, n_in, rank), jnp.float32) / rank).astype(dtype)
    return a, jnp.zeros((*stack, rank, n_out), dtype)


def orthogonal(
    key: jax.Array, path: str, stack: tuple, n_in: int, n_out: int, rank: int, dtype: DTypeLike
) -> tuple[jax.Array, jax.Array]:
    """PEFT's ``orthogonal_init``: ``Q`` of a random ``r x r`` matrix's QR; ``A = G1 Q[0::2]
    / 10``, ``B = Q[1::2]^T G2 / 10`` (``G`` Gaussian), so ``A B = G1 Q[0::2] Q[1::2]^T G2 /
    100 = 0``: the model starts unchanged, each factor full rank."""
    if rank % 2:
        raise LoraError(
            f"init='orthogonal' splits a rotation's rows between A and B, so it "
            f"needs an even rank; {path!r} has rank {rank} (set an even rank, or "
            "rank_pattern for this path)"
        )
    k1, k2, k3 = jax.random.split(key, 3)
    q, _ = jnp.linalg.qr(jax.random.normal(k1, (*stack, rank, rank), jnp.float32))
    g1 = jax.random.normal(k2, (*stack, n_in, rank // 2), jnp.float32)
    g2 = jax.random.normal(k3, (*stack, rank // 2, n_out), jnp.float32)
    a = g1 @ q[..., 0::2, :] / 10.0
    b = jnp.swapaxes(q[..., 1::2, :], -1, -2) @ g2 / 10.0
    return a.astype(dtype), b.astype(dtype)


def _pissa(mat: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """PiSSA: the top-``rank`` singular directions, split evenly between A and B."""
    return _top(mat, rank, scale)


def _pissa_niter(
    mat: jax.Array, rank: int, scale: float, niter: int, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """PiSSA by randomized SVD (PEFT's ``pissa_niter_K``, torch's ``svd_lowrank``: Halko
    et al.): a random ``rank``-column range of ``mat``, refined by ``niter`` subspace
    iterations, then the SVD of ``mat`` projected onto it."""
    omega = jax.random.normal(key, (*mat.shape[:-2], mat.shape[-1], rank), mat.dtype)
    q, _ = jnp.linalg.qr(mat @ omega)
    mt = jnp.swapaxes(mat, -1, -2)
    for _ in range(niter):
        q, _ = jnp.linalg.qr(mt @ q)
        q, _ = jnp.linalg.qr(mat @ q)
    u, s, vh = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ mat, full_matrices=False)
    root = jnp.sqrt(s[..., :rank] / scale)
    return (q @ u[..., :, :rank]) * root[..., None, :], root[..., :, None] * vh[..., :rank, :]


def _olora(mat: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """OLoRA (PEFT's ``olora_init``): QR of the torch-layout weight ``(out, in) = Q R``;
    PEFT's ``lora_B = Q[:, :r]``, ``lora_A = R[:r]``, so ``a = R[:r].T``, ``b = Q[:, :r].T``."""
    q, r = jnp.linalg.qr(jnp.swapaxes(mat, -1, -2))
    return jnp.swapaxes(r[..., :rank, :], -1, -2), jnp.swapaxes(q[..., :, :rank], -1, -2)


_FACTORS = {"pissa": _pissa, "olora": _olora}


def _moved(
    w: jax.Array,
    axes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    rank: int,
    scale: float,
    dtype: DTypeLike,
    factors: Callable[..., tuple[jax.Array, jax.Array]],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Factors ``(a, b)`` from the weight (``factors(mat, rank, scale)`` on each stacked
    ``(in, out)`` matrix, in float32), and the residual base ``W0 - s A B``."""
    mat, back = _matrices(w, axes)
    a, b = factors(mat, rank, scale)
    return a.astype(dtype), b.astype(dtype), back(mat - scale * a @ b).astype(w.dtype)


def _matrices(
    w: jax.Array, axes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """``w`` as float32 ``(*stack, in, out)`` matrices, and the map back to ``w``'s layout."""
    order = [ax for group in axes for ax in group]
    wt = jnp.transpose(w, order).astype(jnp.float32)
    n_in = math.prod(w.shape[ax] for ax in axes[1])

    def back(m: jax.Array) -> jax.Array:
        return jnp.transpose(m.reshape(wt.shape), [order.index(ax) for ax in range(w.ndim)])

    return wt.reshape((*wt.shape[: len(axes[0])], n_in, -1)), back


def _top(res: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """The best rank-``rank`` ``s A B`` of ``res``, the singular values split evenly."""
    u, s, vh = jnp.linalg.svd(res, full_matrices=False)
    root = jnp.sqrt(s[..., :rank] / scale)
    return u[..., :, :rank] * root[..., None, :], root[..., :, None] * vh[..., :rank, :]


def _loftq(
    w: jax.Array,
    axes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    rank: int,
    scale: float,
    dtype: DTypeLike,
    iters: int,
) -> tuple[jax.Array, jax.Array, Quantized]:
    """LoftQ (PEFT's ``loftq_init``, 4 bits): ``iters`` rounds of ``Q = NF4(W - s A B)``,
    ``s A B = SVD_r(W - dequant(Q))``; the base is ``Q`` (jlora's NF4, bitsandbytes'
    format, double quantization), so ``dequant(Q) + s A B`` is closer to ``W`` than
    ``dequant(NF4(W))``. Unlike PEFT's, ``s`` is divided out of the factors, so the
    model starts at that approximation for any alpha."""
    mat, back = _matrices(w, axes)
    a: jax.Array | None = None  # (set by the first round)
    b: jax.Array | None = None
    for _ in range(iters):
        target = mat if a is None or b is None else mat - scale * a @ b
        q = quantize_array(back(target).astype(w.dtype), compute_dtype=w.dtype)
        deq, _ = _matrices(dequantize_array(q), axes)
        a, b = _top(mat - deq, rank, scale)
    assert a is not None and b is not None  # iters >= 1
    return a.astype(dtype), b.astype(dtype), q


#: The factors each base-preserving init starts with, by name (``config.INITS``).
_FRESH = {"kaiming": _kaiming, "gaussian": _gaussian, "orthogonal": orthogonal}
