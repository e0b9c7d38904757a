"""PiSSA by full SVD against ``pissa_niter_K`` (randomized SVD) on a 4096 x 4096 weight.

The weight is a Gaussian matrix (entries N(0, 1/4096)) plus a rank-64 part whose
singular values fall as 8/k (k = 1..64): a decaying top spectrum over a flat
noise floor, as trained weights have. Each row runs ``jlora.init_with_base`` at rank
16 (alpha 32) and reports its wall time (median and min-max over the rounds, the rows
interleaved) and the residual ``||W - s A B||_F`` over the best rank-16 residual, which
full PiSSA attains (1.000).

Run from the repo root: ``python benchmarks/inits.py`` (writes
``benchmarks/results/inits.md``; ``--quick``: 1024 x 1024, one round).
"""

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from core import write_result  # noqa: E402

import jlora  # noqa: E402

RANK, ALPHA = 16, 32.0
INITS = ("pissa", "pissa_niter_1", "pissa_niter_2", "pissa_niter_4", "pissa_niter_8")


def weight(n: int) -> jax.Array:
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (n, 64)))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (n, 64)))
    top = (u * (8.0 / jnp.arange(1, 65))) @ v.T
    return top + jax.random.normal(k3, (n, n)) / jnp.sqrt(n)


def run(params, init: str):
    """Seconds for ``init_with_base`` and the residual it leaves."""
    cfg = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets="w", init=init)
    t0 = time.perf_counter()
    ad, base = jlora.init_with_base(jax.random.key(1), params, cfg)
    jax.block_until_ready((ad, base))
    return time.perf_counter() - t0, float(jnp.linalg.norm(base["w"]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    n, rounds = (1024, 1) if args.quick else (4096, args.rounds)
    params = {"w": weight(n)}
    s = jnp.linalg.svd(params["w"], compute_uv=False)
    best = float(jnp.sqrt(jnp.sum(s[RANK:] ** 2)))
    times = {k: [] for k in INITS}
    resid = {}
    for r in range(rounds):
        for init in INITS[r % len(INITS) :] + INITS[: r % len(INITS)]:  # rotate the order
            t, resid[init] = run(params, init)
            times[init].append(t)
    full = statistics.median(times["pissa"])
    lines = [
        "| init | seconds, median (min-max) | time / full | residual / best rank-16 |",
        "|---|---|---|---|",
    ]
    for init in INITS:
        ts = times[init]
        lines.append(
            f"| {init} | {statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f}) "
            f"| {statistics.median(ts) / full:.3f} | {resid[init] / best:.4f} |"
        )
    note = (
        f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.devices()[0].platform}; a {n} x {n} weight (Gaussian N(0, 1/{n}) plus a "
        f"rank-64 part with singular values 8/k), rank {RANK}, alpha {ALPHA:g}, "
        f"{rounds} rounds in rotating order; full PiSSA's residual is the best rank-{RANK} "
        "one"
    )
    out = "\n".join(lines)
    print(out + "\n\n" + note)
    if not args.quick:
        write_result("inits", f"python benchmarks/inits.py --rounds {rounds}", f"{out}\n\n{note}")


if __name__ == "__main__":
    main()
