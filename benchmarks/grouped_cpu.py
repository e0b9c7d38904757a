"""Why a mixed batch gathers factors per example on a CPU: ``jax.lax.ragged_dot`` there.

The low-rank term of one adapted matmul for a mixed batch of 16 sequences x 128 tokens
(in 512, rank 16, out 512, 64 adapters), two ways, beside the base matmul itself:

- ``grouped``: rows sorted by adapter, ``ragged_dot(x, A)`` then ``ragged_dot(t, B)``
  (S-LoRA/Punica's layout; group sizes from the ids); JAX lowers ``ragged_dot`` on
  the CPU to one dense product with the input replicated per group and masked;
- ``grouped, masked``: the same sorted rows through jlora's CPU form
  (``grouped.ragged_low_rank``: ``x`` times all adapters' ``A``, the rank-``r``
  intermediate masked to each row's adapter, times all ``B``);
- ``gather``: each example gathers its adapter's factors, two batched einsums (jlora's
  mixed-batch path);
- ``base``: ``x @ W0`` for scale.

Run from the repo root: ``python benchmarks/grouped_cpu.py`` (prints the table).
"""

import os
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from core import timeit_interleaved  # noqa: E402

from jlora._src.interpret import grouped as jl_grouped  # noqa: E402

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
    gather = jax.jit(
        lambda x, a, b, e: jnp.einsum(
            "etr,ero->eto", jnp.einsum("etk,ekr->etr", x.reshape(-1, SEQ, K), a[e]), b[e]
        )
    )
    base = jax.jit(lambda x, w: x @ w)
    flat = lambda v: v.reshape(T, OUT)
    assert jnp.allclose(
        flat(grouped(x, a, b, sizes)), flat(gather(x, a, b, example)), rtol=1e-4, atol=1e-2
    )
    masked = jax.jit(lambda x, a, b, s: jl_grouped.ragged_low_rank(x, a, b, s, 1.0, None))
    assert jax.default_backend() not in jl_grouped.DENSE_ON or jnp.allclose(
        masked(x, a, b, sizes), grouped(x, a, b, sizes), rtol=1e-4, atol=1e-2
    )
    calls = {
        "grouped": (grouped, (x, a, b, sizes)),
        "grouped, masked": (masked, (x, a, b, sizes)),
        "gather": (gather, (x, a, b, example)),
        "base": (base, (x, w)),
    }
    times = timeit_interleaved(calls, repeats)
    print("| path | median ms (min-max) |\n|---|---|")
    for k, ts in times.items():
        print(f"| {k} | {statistics.median(ts):.1f} ({min(ts):.1f}-{max(ts):.1f}) |")
    print(
        f"\njax {jax.__version__}, {jax.devices()[0].platform}; {T} rows ({T // SEQ} "
        f"sequences of {SEQ}), in {K}, rank {R}, out {OUT}, {N} adapters, {repeats} rounds"
    )


if __name__ == "__main__":
    main()
