"""Why a mixed batch gathers factors per example on a CPU: ``jax.lax.ragged_dot`` there.

The low-rank term of one adapted matmul for a mixed batch of 16 sequences x 128 tokens
(in 512, rank 16, out 512, 64 adapters), two ways, beside the base matmul itself:

- ``grouped``: rows sorted by adapter, ``ragged_dot(x, A)`` then ``ragged_dot(t, B)``
  (S-LoRA/Punica's layout; group sizes from the ids);
- ``gather``: each example gathers its adapter's factors, two batched einsums (jlora's
  mixed-batch path);
- ``base``: ``x @ W0`` for scale.

Run from the repo root: ``python benchmarks/grouped_cpu.py`` (prints the table).
"""

import statistics
import time

import jax
import jax.numpy as jnp

T, SEQ, K, R, N, OUT = 2048, 128, 512, 16, 64, 512


def main(repeats: int = 7):
    key = jax.random.key(0)
    x = jax.random.normal(key, (T, K))
    a, b = jax.random.normal(key, (N, K, R)), jax.random.normal(key, (N, R, OUT))
    w = jax.random.normal(key, (K, OUT))
    example = jnp.sort(jax.random.randint(key, (T // SEQ,), 0, N))
    rows = jnp.repeat(example, SEQ)
    sizes = jnp.bincount(rows, length=N).astype(jnp.int32)
    grouped = jax.jit(lambda x, a, b, s: jax.lax.ragged_dot(jax.lax.ragged_dot(x, a, s), b, s))
    gather = jax.jit(lambda x, a, b, e: jnp.einsum(
        "etr,ero->eto", jnp.einsum("etk,ekr->etr", x.reshape(-1, SEQ, K), a[e]), b[e]))
    base = jax.jit(lambda x, w: x @ w)
    flat = lambda v: v.reshape(T, OUT)
    assert jnp.allclose(flat(grouped(x, a, b, sizes)), flat(gather(x, a, b, example)),
                        rtol=1e-4, atol=1e-2)
    calls = {"grouped": (grouped, (x, a, b, sizes)), "gather": (gather, (x, a, b, example)),
             "base": (base, (x, w))}
    times = {k: [] for k in calls}
    for f, args in calls.values():
        jax.block_until_ready(f(*args))
    for _ in range(repeats):
        for k, (f, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append((time.perf_counter() - t0) * 1e3)
    print("| path | median ms (min-max) |\n|---|---|")
    for k, ts in times.items():
        print(f"| {k} | {statistics.median(ts):.1f} ({min(ts):.1f}-{max(ts):.1f}) |")
    print(f"\njax {jax.__version__}, {jax.devices()[0].platform}; {T} rows ({T // SEQ} "
          f"sequences of {SEQ}), in {K}, rank {R}, out {OUT}, {N} adapters, {repeats} rounds")


if __name__ == "__main__":
    main()
