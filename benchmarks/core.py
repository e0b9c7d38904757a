"""Core timings of jlora on the example Llama model, side by side in one process.

Prints a markdown table of medians (min-max) over repeated rounds (each round
runs every row once, so slow drift of the machine hits all rows alike), and writes
``benchmarks/results/core.json`` and ``core.md``. Run from the repo root:

    python benchmarks/core.py            # issue-9 config: h512, 4 layers, seq 256, batch 4
    python benchmarks/core.py --quick    # tiny model, for a smoke run
"""

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import jax
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import llama  # noqa: E402

import jlora  # noqa: E402

LR = 2e-4


def write_result(name: str, command: str, table: str, note: str = "") -> None:
    """``benchmarks/results/NAME.md``: the command that made it, the table, a note."""
    with open(os.path.join(os.path.dirname(__file__), "results", name + ".md"), "w") as f:
        f.write(f"`{command}`{note}\n\n{table}\n")


def timeit_interleaved(calls: dict, repeats: int) -> dict:
    """Wall times in ms per call, measured in rounds that run every row once so drift hits
    every row alike; each round runs the rows in its own (seeded) random order, so no row
    always follows the same one (measured: in ``benchmarks/serve.py`` the row after the
    slowest one ran up to 1.4x slower than rows doing the same work)."""
    for f, args in calls.values():
        jax.block_until_ready(f(*args))  # compile
        jax.block_until_ready(f(*args))  # warm
    times = {name: [] for name in calls}
    for k in range(repeats):
        order = list(calls)
        random.Random(k).shuffle(order)
        for name in order:
            f, args = calls[name]
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def build(quick: bool):
    cfg = llama.LlamaConfig.named("tiny" if quick else "bench")
    batch, seq = (2, 64) if quick else (4, 256)
    model = llama.Llama(cfg)
    key = jax.random.key(0)
    params = llama.init_params(cfg, key)
    ids = jax.random.randint(key, (batch, seq + 1), 0, cfg.vocab_size)
    adapters = {}
    for dora in (False, True):
        lcfg = jlora.LoraConfig(
            rank=16, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"), dora=dora
        )
        adapter = jlora.init(key, params, lcfg)
        adapters[dora] = jax.tree.map(lambda v: v + 1e-3, adapter)  # B != 0, as after training
    return cfg, model, params, adapters, ids


def train_step(loss, tx):
    """``jit(step)(trainable, opt_state, *frozen)``: one optimizer step on ``loss``."""

    def step(trainable, opt_state, *frozen):
        grads = jax.grad(loss)(trainable, *frozen)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    return jax.jit(step)


def steps(model, params, ids, adapters):
    """``{row: (jitted function, its arguments)}``."""
    x, y = ids[:, :-1], ids[:, 1:]
    lora_fwd = jax.jit(jlora.apply(model.apply))
    tx = optax.adamw(LR)
    lora_loss = lambda ad, p: llama.loss_fn(jlora.apply(model.apply)(p, ad, x), y)
    full_loss = lambda p: llama.loss_fn(model.apply(p, x), y)
    mof_loss = lambda ad, p: full_loss(jlora.merge(p, ad))

    make_step = lambda loss: train_step(loss, tx)
    # The floor for any adapter method: train only the RMSNorm weights, so the step runs the
    # full forward and the backward through every layer, with no weight gradients to speak of.
    flat, tdef = jax.tree_util.tree_flatten_with_path(params)
    is_norm = ["norm" in jax.tree_util.keystr(k) for k, _ in flat]
    norms = [v for (_, v), m in zip(flat, is_norm) if m]
    rest = [v for (_, v), m in zip(flat, is_norm) if not m]

    def frozen_loss(norms, rest):
        it, ir = iter(norms), iter(rest)
        return full_loss(tdef.unflatten([next(it) if m else next(ir) for m in is_norm]))

    ad, dora = adapters[False], adapters[True]
    return dict(
        base_forward=(jax.jit(model.apply), (params, x)),
        lora_forward=(lora_fwd, (params, ad, x)),
        merged_forward=(jax.jit(model.apply), (jlora.merge(params, ad), x)),
        lora_step=(make_step(lora_loss), (ad, tx.init(ad), params)),
        dora_step=(make_step(lora_loss), (dora, tx.init(dora), params)),
        full_step=(make_step(full_loss), (params, tx.init(params))),
        frozen_step=(make_step(frozen_loss), (norms, tx.init(norms), rest)),
        merge_on_the_fly_step=(make_step(mof_loss), (ad, tx.init(ad), params)),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    cfg, model, params, adapters, ids = build(args.quick)
    calls = steps(model, params, ids, adapters)
    times = timeit_interleaved(calls, args.repeats)
    rows = {}
    for name, (f, call_args) in calls.items():
        t = times[name]
        flops = f.lower(*call_args).compile().cost_analysis()["flops"]
        rows[name] = dict(
            median_ms=statistics.median(t), min_ms=min(t), max_ms=max(t), gflop=flops / 1e9
        )
    base, full = rows["base_forward"]["median_ms"], rows["full_step"]["median_ms"]
    full_gflop = rows["full_step"]["gflop"]
    lines = [
        "| measurement | median ms (min-max) | / base forward | / full step "
        "| XLA GFLOP | FLOPs / full step |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f}) "
            f"| {r['median_ms'] / base:.2f} | {r['median_ms'] / full:.2f} "
            f"| {r['gflop']:.1f} | {r['gflop'] / full_gflop:.2f} |"
        )
    env = (
        f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {jax.devices()[0].platform}; model h{cfg.hidden_size} "
        f"L{cfg.num_layers} vocab {cfg.vocab_size}, batch x seq = {ids.shape[0]}x"
        f"{ids.shape[1] - 1}, LoRA and DoRA r16 a32 q,k,v,o, fp32, {args.repeats} runs. XLA's "
        "cost_analysis counts the scanned layer body once, so GFLOP columns compare rows; "
        "tests/test_flops.py checks the unscanned totals too"
    )
    dora_ratio = rows["dora_step"]["median_ms"] / rows["lora_step"]["median_ms"]
    lines.append(f"\nDoRA step / LoRA step: {dora_ratio:.2f}")
    table = "\n".join(lines)
    print(table + "\n\n" + env)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "core_quick" if args.quick else "core")
    with open(stem + ".json", "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(
            f"`python benchmarks/core.py{' --quick' if args.quick else ''}`\n\n{table}\n\n{env}\n"
        )


if __name__ == "__main__":
    main()
