"""LoRA step time and FLOPs as rank and width grow, jlora vs full fine-tuning (a PNG).

Rank 4..128 at the bench width (hidden 512), and hidden 256..2048 (intermediate
~2.75x, 4 layers, vocab 8000) at rank 16; LoRA on q,k,v,o; batch 2 x seq 128;
medians of interleaved rounds. Run from the repo root: ``python benchmarks/scaling.py``
(writes ``benchmarks/results/scaling.png`` and ``scaling.md``).
"""

import argparse
import os
import statistics
import sys

import jax
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import llama  # noqa: E402
from core import timeit_interleaved, train_step  # noqa: E402

import jlora  # noqa: E402

RANKS, WIDTHS, BATCH, SEQ = (4, 8, 16, 32, 64, 128), (256, 512, 1024, 2048), 2, 128
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def steps(hidden: int, rank: int):
    cfg = llama.LlamaConfig.named(
        "bench",
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75) // 64 * 64,
        num_heads=max(hidden // 64, 1),
    )
    model, key = llama.Llama(cfg), jax.random.key(0)
    params = llama.init_params(cfg, key)
    ids = jax.random.randint(key, (BATCH, SEQ + 1), 0, cfg.vocab_size)
    ad = jlora.init(key, params, jlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS))
    tx = optax.adamw(1e-4)
    lora = lambda a, p: llama.loss_fn(jlora.apply(model.apply)(p, a, ids[:, :-1]), ids[:, 1:])
    full = lambda p: llama.loss_fn(model.apply(p, ids[:, :-1]), ids[:, 1:])
    return {
        "lora": (train_step(lora, tx), (ad, tx.init(ad), params)),
        "full": (train_step(full, tx), (params, tx.init(params))),
    }


def measure(hidden, rank, repeats):
    calls = steps(hidden, rank)
    times = timeit_interleaved(calls, repeats)
    flops = {k: f.lower(*a).compile().cost_analysis()["flops"] for k, (f, a) in calls.items()}
    return {k: (statistics.median(times[k]), flops[k]) for k in calls}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    by_rank = {r: measure(512, r, args.repeats) for r in RANKS}
    by_width = {h: measure(h, 16, args.repeats) for h in WIDTHS}
    lines = [
        "| sweep | value | LoRA step ms | full step ms | time ratio | FLOPs ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, sweep in (("rank (h512)", by_rank), ("hidden (r16)", by_width)):
        for v, m in sweep.items():
            lines.append(
                f"| {name} | {v} | {m['lora'][0]:.0f} | {m['full'][0]:.0f} | "
                f"{m['lora'][0] / m['full'][0]:.2f} | "
                f"{m['lora'][1] / m['full'][1]:.2f} |"
            )
    table = "\n".join(lines)
    print(table)
    out = os.path.join(os.path.dirname(__file__), "results")
    with open(os.path.join(out, "scaling.md"), "w") as f:
        f.write(
            f"`python benchmarks/scaling.py --repeats {args.repeats}` (jax {jax.__version__}"
            f", {os.cpu_count()} CPU cores; batch {BATCH} x seq {SEQ}, 4 layers, vocab 8000,"
            f" LoRA on q,k,v,o; FLOPs from XLA cost_analysis, scanned body counted once)"
            f"\n\n{table}\n"
        )
    plot(by_rank, by_width, os.path.join(out, "scaling.png"))


def plot(by_rank, by_width, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, sweep, label in (
        (axes[0], by_rank, "rank (hidden 512)"),
        (axes[1], by_width, "hidden size (rank 16)"),
    ):
        xs = list(sweep)
        for kind, style in (("lora", "o-"), ("full", "s--")):
            ax.plot(xs, [sweep[x][kind][0] for x in xs], style, label=f"{kind} step time")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("ms per step")
        twin = ax.twinx()
        twin.plot(
            xs,
            [sweep[x]["lora"][1] / sweep[x]["full"][1] for x in xs],
            "g:",
            label="LoRA / full FLOPs",
        )
        twin.set_ylabel("LoRA / full FLOPs")
        twin.set_ylim(0, 1.2)
        ax.legend(loc="upper left", fontsize=8)
        twin.legend(loc="lower right", fontsize=8)
    fig.suptitle("jlora LoRA step vs full fine-tuning (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
