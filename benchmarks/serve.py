"""Serving many adapters over one base: mixed-adapter batches and adapter switching.

The bench-size example model (h512, 4 layers, vocab 8000), LoRA r16 on q,k,v,o,
medians over interleaved rounds, in two shapes: prefill (forward of batch 16 x seq 128)
and decode (one token for each of 64 sequences, over a KV cache of 128 positions):

- ``single``: the batch through one adapter (the reference throughput);
- ``mixed n``: the same batch through ``jlora.stack`` of n adapters, example i
  using adapter ``i % n``, in one call, each example gathering its factors;
- ``grouped n``: the same, rows sorted by adapter through two ``ragged_dot``s
  (``jlora.apply(fn, mixed="grouped")``; on a CPU two masked dense products);
- ``onehot n``: the same, every row against all n adapters' factors, keeping its own
  by a one-hot weight (``mixed="onehot"``, sglang-jax's TPU form);
- ``split n``: the same n adapters served one sub-batch each (n calls of the
  single-adapter function on batch 16/n);
- ``switch``: the single-adapter call alternating between two adapters (same
  compiled function; no retrace);
- ``ranks 8-64 padded`` / ``ranked``: four adapters of ranks 8, 16, 32 and 64 (example
  i uses adapter i % 4), padded to rank 64 (``adapter_ids`` traced) or each rank
  class at its own rank (``adapter_ids`` known when the call is traced).

Run from the repo root: ``python benchmarks/serve.py`` (writes
``benchmarks/results/serve.md``; ``--quick`` for a tiny smoke run).
"""

import argparse
import os
import platform
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import llama  # noqa: E402
from core import timeit_interleaved, write_result  # noqa: E402

import jlora  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANKS = (8, 16, 32, 64)


def build(quick: bool, counts, decode: bool):
    """The rows' calls: prefill (the whole batch's sequences) or one decode step (one token
    per sequence, attending over a KV cache of ``seq`` positions)."""
    cfg = llama.LlamaConfig.named("tiny" if quick else "bench")
    batch, seq = (
        ((64, 32) if quick else (64, 128)) if decode else ((16, 32) if quick else (16, 128))
    )
    model = llama.Llama(cfg)
    key = jax.random.key(0)
    params = llama.init_params(cfg, key)
    ids = jax.random.randint(key, (batch, 1 if decode else seq), 0, cfg.vocab_size)
    lcfg = jlora.LoraConfig(rank=16, alpha=32.0, targets=TARGETS)
    adapters = [
        jax.tree.map(
            lambda v, i=i: v + 1e-3 * (i + 1), jlora.init(jax.random.fold_in(key, i), params, lcfg)
        )
        for i in range(max(counts))
    ]
    at = jnp.int32(seq)
    cache = llama.init_cache(cfg, batch, seq + 1) if decode else None
    extra = lambda c: (jnp.full((c[0].shape[1], 1), seq), None, c, at) if decode else ()
    axes = (0, 0, None, 1, None) if decode else None
    single = jax.jit(lambda p, ad, x, c: jlora.apply(model.apply)(p, ad, x, *extra(c)))
    mixed, grouped, onehot = (
        jax.jit(
            lambda p, st, x, c, i, run=jlora.apply(model.apply, mixed=m): run(
                p, st, x, *extra(c), adapter_ids=i, example_axes=axes
            )
        )
        for m in ("gather", "grouped", "onehot")
    )
    calls = {
        "single": (single, (params, adapters[0], ids, cache)),
        "switch": (
            lambda p, x, c: [single(p, adapters[k % 2], x, c) for k in range(2)][-1],
            (params, ids, cache),
        ),
    }
    for n in counts:
        aid = jnp.arange(batch) % n
        calls[f"mixed {n}"] = (mixed, (params, jlora.stack(adapters[:n]), ids, cache, aid))
        calls[f"grouped {n}"] = (grouped, calls[f"mixed {n}"][1])
        calls[f"onehot {n}"] = (onehot, calls[f"mixed {n}"][1])
        if batch % n == 0:
            sub = batch // n
            part = lambda c, k, sub=sub: (
                None if c is None else tuple(x[:, k * sub : (k + 1) * sub] for x in c)
            )
            parts = [part(cache, k) for k in range(n)]
            calls[f"split {n}"] = (
                lambda p, x, n=n, sub=sub, parts=parts: [
                    single(p, adapters[k], x[k * sub : (k + 1) * sub], parts[k]) for k in range(n)
                ],
                (params, ids),
            )
    mixed_ranks(calls, model, params, key, ids, cache, extra, axes)
    return calls, (cfg, batch, seq)


def mixed_ranks(calls, model, params, key, ids, cache, extra, axes):
    """Four adapters of ranks 8, 16, 32, 64 (example i uses adapter i % 4): padded to 64
    (``adapter_ids`` traced) or each rank class at its own rank (ids known when traced)."""
    ads = [
        jlora.init(
            jax.random.fold_in(key, r),
            params,
            jlora.LoraConfig(rank=r, alpha=2.0 * r, targets=TARGETS),
        )
        for r in RANKS
    ]
    st = jlora.stack([jax.tree.map(lambda v: v + 1e-3, ad) for ad in ads])
    aid = jnp.arange(ids.shape[0]) % len(RANKS)
    run = jlora.apply(model.apply)
    padded = jax.jit(
        lambda p, st, x, c, i: run(p, st, x, *extra(c), adapter_ids=i, example_axes=axes)
    )
    ranked = jax.jit(
        lambda p, st, x, c: run(p, st, x, *extra(c), adapter_ids=np.asarray(aid), example_axes=axes)
    )
    calls["ranks 8-64 padded"] = (padded, (params, st, ids, cache, aid))
    calls["ranks 8-64 ranked"] = (ranked, (params, st, ids, cache))


def table(calls, repeats: int) -> str:
    times = timeit_interleaved(calls, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = ["| row | median ms (min-max) | throughput / single |", "|---|---|---|"]
    for name, ts in times.items():
        k = 2 if name == "switch" else 1  # the switch row times two calls
        lines.append(
            f"| {name} | {med[name] / k:.1f} ({min(ts) / k:.1f}-{max(ts) / k:.1f}) | "
            f"{k * med['single'] / med[name]:.2f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args()
    parts = []
    for decode in (False, True):
        calls, (cfg, batch, seq) = build(args.quick, args.counts, decode)
        what = (
            f"decode: one token for each of {batch} sequences over a KV cache of {seq}"
            if decode
            else f"prefill: forward of batch {batch} x seq {seq}"
        )
        parts.append(f"**{what}**\n\n{table(calls, args.repeats)}")
    note = (
        f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.devices()[0].platform}; model h{cfg.hidden_size} L{cfg.num_layers} vocab "
        f"{cfg.vocab_size}, LoRA r16 a32 q,k,v,o, {args.repeats} interleaved rounds; "
        "'switch' is per call, alternating two adapters; 'mixed n': example i uses "
        "adapter i % n in one call (gathered factors); 'grouped n': the same sorted by "
        "adapter (ragged_dot; on a CPU masked dense products); 'onehot n': the same by "
        "a one-hot contraction over the adapters; 'split n': one call per adapter's "
        "sub-batch; 'ranks 8-64': four adapters of ranks 8-64, padded to 64 or each "
        "rank class at its own rank"
    )
    out = "\n\n".join(parts)
    print(out + "\n\n" + note)
    if not args.quick:
        write_result(
            "serve", f"python benchmarks/serve.py --repeats {args.repeats}", f"{out}\n\n{note}"
        )


if __name__ == "__main__":
    main()
