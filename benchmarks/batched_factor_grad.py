"""The batched factor gradient (per-example or per-layer factors) in the two forms
``thin._transpose_f`` could emit: the plain product with an ``(n, in, r)`` output, which
jlora uses since XLA's CPU compiler aborted on the other at small shapes (issue 28), and the
rank-major product behind an ``optimization_barrier`` plus a transpose, which it still
uses for unbatched factors. Interleaved rounds in random order; medians with min-max.

Run from the repo root: ``python benchmarks/batched_factor_grad.py``.
"""

import time

import jax
import numpy as np
from jax import lax

from jlora._src.interpret.thin import contract

N, S, IN, R, ROUNDS = 8, 256, 1024, 16, 15


def plain(x, dt):
    return contract("nsi,nsr->nir", x, dt)


def barrier(x, dt):
    z = lax.optimization_barrier(contract("nsr,nsi->nri", dt, x))
    return lax.transpose(z, (0, 2, 1))


def main():
    x = jax.random.normal(jax.random.key(0), (N, S, IN))
    dt = jax.random.normal(jax.random.key(1), (N, S, R))
    fs = {"plain (used)": jax.jit(plain), "barrier + transpose": jax.jit(barrier)}
    for f in fs.values():
        f(x, dt).block_until_ready()
    np.testing.assert_allclose(
        fs["plain (used)"](x, dt), fs["barrier + transpose"](x, dt), rtol=1e-4, atol=1e-3
    )
    times = {k: [] for k in fs}
    order = np.random.default_rng(0)
    for _ in range(ROUNDS):
        for k in order.permutation(list(fs)):
            t = time.perf_counter()
            fs[k](x, dt).block_until_ready()
            times[k].append(time.perf_counter() - t)
    print(f"n={N} s={S} in={IN} r={R}, {ROUNDS} rounds on {jax.devices()[0].platform}\n")
    print("| form | median ms | min-max ms |\n|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {np.median(v) * 1e3:.2f} | {min(v) * 1e3:.2f}-{max(v) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
