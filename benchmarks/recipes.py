"""Which training recipe helps: every init and optimizer on the main example's tasks.

The base is ``examples/train_tasks.py``'s pretrained tiny Llama (its cache, or 400 steps
of pretraining on ``copy``). Each recipe trains one adapter per task (the "general"
preset: r16, alpha 32, q,k,v,o) for the same number of steps, the same batches and the
same schedule (linear warm-up, cosine decay, peak ``--lr``), from 3 seeds, and reports
the final training loss (mean of the last 10 steps) and the held-out answer-token
accuracy (teacher forced, 512 examples), as medians with min-max over the seeds.

Recipes: plain LoRA (kaiming, AdamW), LoRA+ (B at 16x), and each other init with AdamW
(gaussian, orthogonal, PiSSA, PiSSA by randomized SVD, OLoRA, LoRA-GA and CorDA from 4
training batches, EVA with rho 1), then LoRA-FA and Riemannian preconditioning on kaiming.

Run from the repo root: ``python benchmarks/recipes.py`` (writes
``benchmarks/results/recipes.md``; ``--quick``: one seed, few steps).
"""

import argparse
import os
import platform
import statistics
import sys
import zlib

import jax
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import llama  # noqa: E402
import tasks  # noqa: E402
import train_tasks as tt  # noqa: E402
from core import write_result  # noqa: E402

import jlora  # noqa: E402

DATA_INITS = ("lora_ga", "corda", "eva")
#: name: (init, optimizer)
RECIPES = {
    "LoRA (kaiming, AdamW)": ("kaiming", "adamw"),
    "LoRA+ (B at 16x)": ("kaiming", "loraplus"),
    "gaussian": ("gaussian", "adamw"),
    "orthogonal": ("orthogonal", "adamw"),
    "PiSSA": ("pissa", "adamw"),
    "PiSSA, randomized (niter 4)": ("pissa_niter_4", "adamw"),
    "OLoRA": ("olora", "adamw"),
    "LoRA-GA": ("lora_ga", "adamw"),
    "CorDA (IPM)": ("corda", "adamw"),
    "EVA": ("eva", "adamw"),
    "LoRA-FA": ("kaiming", "lorafa"),
    "Riemannian": ("kaiming", "riemannian"),
}


def optimizer(name: str, lr, steps: int):
    sched = tt.schedule(lr, steps)
    if name == "loraplus":
        return jlora.loraplus(optax.adamw, sched, ratio=16.0, weight_decay=0.0)
    if name == "lorafa":
        return jlora.lorafa(optax.adamw, sched, weight_decay=0.0)
    if name == "riemannian":
        return jlora.riemannian(optax.adamw, sched, weight_decay=0.0)
    return optax.adamw(sched, weight_decay=0.0)


def start(model, params, init: str, key, task: str):
    """The adapter and the base it trains on."""
    cfg = jlora.LoraConfig.preset(tt.PRESET, init=init)
    if init not in DATA_INITS:
        return tuple(jlora.init_with_base(key, params, cfg))
    batches = [
        tasks.task_batch(jax.random.fold_in(key, 100 + i), task, tt.BATCH, tt.LENGTH)
        for i in range(4)
    ]
    fn = lambda p, ids, mask: (model.apply(p, ids[:, :-1]), ids, mask)
    loss = lambda out: tt.next_token_loss(*out)
    extra = {"rho": 1.0} if init == "eva" else {}  # a scanned stack: one rank per leaf
    return tuple(jlora.init_from_data(key, params, cfg, fn, batches, loss=loss, **extra))


def train(model, params, recipe, task: str, seed: int, steps: int, lr: float):
    init, opt = recipe
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(task.encode()))
    adapter, base = start(model, params, init, key, task)
    tx = optimizer(opt, lr, steps)
    step = tt.make_lora_step(model, tx)
    batch_of = jax.jit(tasks.task_batch, static_argnums=(1, 2, 3))
    state, losses = (adapter, tx.init(adapter)), []
    for i in range(steps):
        ids, mask = batch_of(jax.random.fold_in(key, i), task, tt.BATCH, tt.LENGTH)
        state, loss = step(base, state, ids, mask)
        losses.append(float(loss))
    ids, mask = tasks.task_batch(
        jax.random.fold_in(jax.random.key(99), zlib.crc32(task.encode())),
        task,
        tt.EVAL_BATCH,
        tt.LENGTH,
    )
    logits = jax.jit(jlora.apply(model.apply))(base, state[0], ids[:, :-1])
    hits = (logits.argmax(-1) == ids[:, 1:]) * mask
    return statistics.mean(losses[-10:]), float(hits.sum() / mask.sum())


def cell(values, fmt: str) -> str:
    return (
        f"{format(statistics.median(values), fmt)} "
        f"({format(min(values), fmt)}-{format(max(values), fmt)})"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=tt.LR)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tasks", default="reverse,caesar")
    args = p.parse_args()
    steps, seeds = (5, 1) if args.quick else (args.steps, args.seeds)
    model = llama.Llama(llama.LlamaConfig(**tt.MODEL))
    base_args = tt.parse_args(["--smoke"] if args.quick else [])
    params, _ = tt.cached_base(model, base_args)
    task_list = args.tasks.split(",")
    lines = [
        "| recipe | " + " | ".join(f"{t} loss | {t} accuracy" for t in task_list) + " |",
        "|---|" + "---|---|" * len(task_list),
    ]
    for name, recipe in RECIPES.items():
        row = [name]
        for task in task_list:
            got = [train(model, params, recipe, task, s, steps, args.lr) for s in range(seeds)]
            row += [cell([g[0] for g in got], ".4f"), cell([100 * g[1] for g in got], ".1f")]
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    note = (
        f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} cores; the main "
        f"example's base (hidden 128, 2 layers), preset {tt.PRESET} (r16, alpha 32, "
        f"q,k,v,o), {steps} steps of batch {tt.BATCH}, peak lr {args.lr:g} (LoRA+: A's; "
        f"B at 16x), {seeds} seeds; loss: mean of the last 10 steps; accuracy: held-out "
        "answer tokens, teacher forced, %; medians (min-max) over the seeds"
    )
    out = "\n".join(lines)
    print("\n" + out + "\n\n" + note)
    if not args.quick:
        write_result(
            "recipes",
            f"python benchmarks/recipes.py --steps {steps} --seeds {seeds} --tasks {args.tasks}",
            f"{out}\n\n{note}",
        )


if __name__ == "__main__":
    main()
