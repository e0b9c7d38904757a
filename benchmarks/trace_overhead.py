"""What ``jlora.apply`` costs before the first step runs: tracing, lowering, compiling.

On a 24-layer unscanned Llama (Python-loop layers, LoRA r16 on q,k,v,o), times
``jax.jit(f).lower(...)`` and ``.compile()`` for the model alone and through
``jlora.apply``, for the forward and for the gradient step (the base's gradient
w.r.t. all params, LoRA's w.r.t. the adapter), plus one eager (un-jitted) call
of each. Rounds are interleaved (each round runs every row once) and every
round builds new functions, so nothing is served from a cache (a first, discarded
round warms the per-primitive caches that eager calls use), and which of the two
goes first alternates between rounds. Prints medians
(min-max) and the ratios LoRA / base, and writes ``results/trace_overhead.md``. The
``eager2`` row is a second un-jitted call of the same function: jlora keeps the traced
jaxpr (issue 30's goal: at most 1.2x the model's own eager call).

    python benchmarks/trace_overhead.py              # 24 layers, h128, 5 rounds
    python benchmarks/trace_overhead.py --quick      # 4 layers, 2 rounds (a smoke run)
"""

import argparse
import gc
import os
import platform
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
sys.path.insert(0, os.path.dirname(__file__))
import llama  # noqa: E402
from core import write_result  # noqa: E402

import jlora  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def build(layers: int):
    cfg = llama.LlamaConfig.named("tiny", num_layers=layers, scan_layers=False)
    model, key = llama.Llama(cfg), jax.random.key(0)
    params = llama.init_params(cfg, key)
    ids = jax.random.randint(key, (2, 65), 0, cfg.vocab_size)
    adapter = jlora.init(key, params, jlora.LoraConfig(rank=16, alpha=32.0, targets=TARGETS))
    return model, params, jax.tree.map(lambda v: v + 1e-3, adapter), ids[:, :-1], ids[:, 1:]


def rows(model, params, adapter, x, y):
    """``{row: (make a new function, its arguments)}``; new functions defeat JAX's caches."""

    def base_fwd():
        return lambda p, x: model.apply(p, x)

    def lora_fwd():
        return jlora.apply(lambda p, x: model.apply(p, x))

    def base_grad():
        return jax.grad(lambda p, x: llama.loss_fn(model.apply(p, x), y))

    def lora_grad():
        f = jlora.apply(lambda p, x: model.apply(p, x))
        return jax.grad(lambda ad, p, x: llama.loss_fn(f(p, ad, x), y))

    return dict(
        forward=((base_fwd, (params, x)), (lora_fwd, (params, adapter, x))),
        grad=((base_grad, (params, x)), (lora_grad, (adapter, params, x))),
    )


def measure(make, args) -> dict:
    """Seconds to lower and to compile a new jit of ``make()``, for one eager call of a
    new function and for a second eager call of that function (jlora keeps its jaxpr)."""
    gc.collect()
    t0 = time.perf_counter()
    lowered = jax.jit(make()).lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    f = make()
    jax.block_until_ready(f(*args))
    t3 = time.perf_counter()
    jax.block_until_ready(f(*args))
    t4 = time.perf_counter()
    return dict(lower=t1 - t0, compile=t2 - t1, both=t2 - t0, eager=t3 - t2, eager2=t4 - t3)


def fmt(ts) -> str:
    return f"{statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    layers, rounds = (4, 2) if args.quick else (args.layers, args.rounds)
    cases = rows(*build(layers))
    times = {(row, who): [] for row in cases for who in ("base", "lora")}
    for r in range(rounds + 1):  # round 0 warms JAX's per-primitive caches (eager calls)
        for row, (base, lora) in cases.items():
            if r % 2:  # alternate which goes first, so neither always pays for the other
                b, lo = measure(*base), measure(*lora)
            else:
                lo, b = measure(*lora), measure(*base)
            if r:
                times[row, "base"].append(b)
                times[row, "lora"].append(lo)
    lines = [
        "| row | what | base s | jlora s | jlora / base (median of per-round ratios) |",
        "|---|---|---|---|---|",
    ]
    for row in cases:
        for what in ("lower", "compile", "both", "eager", "eager2"):
            b = [t[what] for t in times[row, "base"]]
            lo = [t[what] for t in times[row, "lora"]]
            ratio = statistics.median(l / x for l, x in zip(lo, b))
            lines.append(f"| {row} | {what} | {fmt(b)} | {fmt(lo)} | {ratio:.2f} |")
    env = (
        f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; Llama tiny (h128) x {layers} unscanned layers, batch 2 x "
        f"seq 64, LoRA r16 q,k,v,o; {rounds} interleaved rounds; 'both' = lower + compile, "
        "'eager' = one un-jitted call of a new function, 'eager2' = its second call"
    )
    table = "\n".join(lines)
    print(table + "\n\n" + env)
    if not args.quick:
        write_result(
            "trace_overhead",
            f"python benchmarks/trace_overhead.py --rounds {rounds}",
            table,
            "\n\n" + env,
        )


if __name__ == "__main__":
    main()
