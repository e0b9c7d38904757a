"""CPU-backend facts quoted in the notes, measured: the thin low-rank matmuls on
XLA's CPU backend (and the one-matmul ``x @ [W0 | A]`` alternative), the layout of
the first factor's gradient ``dA = x^T dt``, and bitsandbytes' CPU 4-bit kernels
against its reference code.

Run from the repo root: ``python benchmarks/cpu_kernels.py`` (bitsandbytes part needs
the ``interop`` extra; it is skipped with a message otherwise).
"""

import statistics
import time

import jax
import numpy as np


def _ms(f, *args, n=30):
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def thin_matmuls(rank: int = 16) -> None:
    print(
        "| tokens x in x out | x@W | x@A alone | x@W + (x@A)@B | vjp of x@W (dx) | "
        "vjp of the LoRA form (dx, dA, dB) | concat form: x@[W, A] split | its vjp |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    for t, i, o in ((1024, 512, 1408), (1024, 1408, 512), (1024, 512, 512)):
        ks = jax.random.split(jax.random.key(0), 5)
        x, w = jax.random.normal(ks[0], (t, i)), jax.random.normal(ks[1], (i, o))
        a, b = jax.random.normal(ks[2], (i, rank)), jax.random.normal(ks[3], (rank, o))
        g = jax.random.normal(ks[4], (t, o))
        base = lambda x, w, a, b: x @ w
        lora = lambda x, w, a, b: x @ w + (x @ a) @ b

        def concat(x, w, a, b):  # one matmul against [W0 | A], then the rank-r product
            y = x @ jax.numpy.concatenate([w, a], axis=1)
            return y[:, :o] + y[:, o:] @ b

        vjp = lambda f: lambda x, w, a, b, g: jax.vjp(lambda x, a, b: f(x, w, a, b), x, a, b)[1](g)
        row = [
            _ms(base, x, w, a, b),
            _ms(lambda x, a: x @ a, x, a),
            _ms(lora, x, w, a, b),
            _ms(vjp(base), x, w, a, b, g),
            _ms(vjp(lora), x, w, a, b, g),
            _ms(concat, x, w, a, b),
            _ms(vjp(concat), x, w, a, b, g),
        ]
        print(f"| {t} x {i} x {o} | " + " | ".join(f"{v:.2f} ms" for v in row) + " |")


def factor_gradient(rank: int = 16, repeats: int = 5) -> None:
    """``dA = x^T dt`` as JAX writes it (an ``(in, r)`` output), as ``(dt^T x)^T`` (XLA
    folds the transpose back: the same program) and as jlora's transpose rule emits it
    (the ``(r, in)`` product behind an ``optimization_barrier``, then transposed)."""
    from jax import lax

    forms = {
        "x^T dt": lambda x, t: x.T @ t,
        "(dt^T x)^T": lambda x, t: (t.T @ x).T,
        "jlora: barrier((dt^T x))^T": lambda x, t: lax.optimization_barrier(t.T @ x).T,
    }
    print(
        f"\n| tokens x in (r {rank}) | " + " | ".join(forms) + " | speed-up |"
        "\n|---|" + "---|" * (len(forms) + 1)
    )
    for t, i in ((1024, 512), (1024, 1408)):
        ks = jax.random.split(jax.random.key(1), 2)
        x, dt = jax.random.normal(ks[0], (t, i)), jax.random.normal(ks[1], (t, rank))
        got = {k: [] for k in forms}
        for _ in range(repeats):  # the forms interleaved, medians of medians
            for k, f in forms.items():
                got[k].append(_ms(f, x, dt))
        med = [statistics.median(v) for v in got.values()]
        print(
            f"| {t} x {i} | "
            + " | ".join(
                f"{m:.3f} ms ({min(v):.3f}-{max(v):.3f})" for m, v in zip(med, got.values())
            )
            + f" | {med[0] / med[-1]:.1f}x |"
        )


def bitsandbytes_cpu() -> None:
    try:
        import bitsandbytes.functional as F
        import torch
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    except ImportError as e:
        print(f"bitsandbytes part skipped: {e}")
        return
    from jlora._src.numerics import quant

    torch.manual_seed(0)
    w = torch.randn(128, 96)
    q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    kernel = (F.dequantize_4bit(q, st) - w).abs().max().item()
    ref = _dequantize_4bit_compute(
        q.reshape(-1), st.absmax, F.get_4bit_type("nf4", device="cpu"), 64, w.shape, torch.float32
    )
    print(
        f"bitsandbytes {__import__('bitsandbytes').__version__} NF4 on N(0,1) 128x96: max "
        f"error of its CPU dequantize_4bit {kernel:.3f}, of its torch reference "
        f"{(ref - w).abs().max().item():.3f} (NF4 bound: half the widest code gap x absmax "
        f"= {float(np.max(np.diff(quant.NF4_CODE))) / 2 * st.absmax.max().item():.3f})"
    )
    x = np.random.default_rng(1).standard_normal((128, 96)).astype(np.float32) * 0.02
    _, st2 = F.quantize_4bit(
        torch.tensor(x), blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    ours = np.asarray(quant.quantize_array(x).absmax)
    print(
        f"double quantization, 8-bit absmax codes differing from its CPU kernel: "
        f"{int((ours != st2.absmax.numpy()).sum())} of {ours.size}"
    )


if __name__ == "__main__":
    thin_matmuls()
    factor_gradient()
    bitsandbytes_cpu()
