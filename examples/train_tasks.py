"""The whole LoRA story on one small model: one frozen base, one adapter per task.

Run: python examples/train_tasks.py          (a few minutes on 2 CPU cores)
     python examples/train_tasks.py --smoke  (end to end in seconds, no accuracy claims)

1. Pretrain a tiny Llama (`llama.py`) with full fine-tuning on `copy` of prompts
   of random lengths (`tasks.py`): it learns the ``prompt|answer`` format and
   to look back at the prompt, but none of the other tasks. Cached.
2. Freeze it and train one LoRA adapter per task (reverse, sort, upper, caesar)
   with the "general" preset (r16, alpha 32, q,k,v,o) and LoRA+ (B learns 16x
   faster than A), 1000 steps each, through one jitted train step shared by all
   adapters. (At 600 steps reverse stalled at 74-88% for some seeds and thread
   counts; benchmarks/example_margin.py measures the margin.)
3. Save every adapter, load it back, and evaluate all tasks with ONE jitted
   ``jlora.apply(model.apply)``: swapping adapters does not recompile.
4. Merge one adapter into the base and check the logits do not change.
5. Print base vs adapter accuracy per task, the adapter size, the step time, and
   draw the loss curves.
"""

import argparse
import functools
import hashlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama
import tasks
from train_utils import plot_losses, run_steps, shown

import jlora

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = {
    "vocab_size": tasks.VOCAB,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_layers": 2,
    "num_heads": 4,
    "scan_layers": True,
}
LENGTH = 8  # Letters per prompt (and per answer).
BATCH = 64
EVAL_BATCH = 512
PRETRAIN_STEPS, PRETRAIN_LR = 400, 3e-3
STEPS, LR, LORAPLUS_RATIO = 1000, 5e-4, 16.0  # LR is A's rate; B gets LR * ratio.
WARMUP_FRACTION, WEIGHT_DECAY = 0.1, 0.0
PRESET = "general"
DEFAULT_TASKS = "reverse,sort,upper,caesar"
SMOKE_PRETRAIN_STEPS, SMOKE_STEPS = 20, 10
BASE_MAX_ACC, ADAPTER_MIN_ACC = 0.30, 0.90  # What "clearly beats the base" means.
EVAL_KEY, BASE_KEY, ADAPTER_KEY = 0, 1, 2  # fold_in offsets of the seed key.
LOSSES = "losses"  # Name of the pretraining loss curve in the cached base file.


def parse_args(argv=None):
    """Parses the command line (``argv``, default ``sys.argv[1:]``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=STEPS, help="train steps per adapter")
    p.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    p.add_argument("--preset", default=PRESET, choices=sorted(jlora.PRESETS))
    p.add_argument("--lr", type=float, default=LR, help="A's peak learning rate (B: x ratio)")
    p.add_argument(
        "--tasks", default=DEFAULT_TASKS, help=f"comma-separated, of {list(tasks.TASKS)}"
    )
    p.add_argument("--out", default=os.path.join(HERE, ".cache"), help="cache and output dir")
    p.add_argument("--fresh", action="store_true", help="ignore the cached pretrained base")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps only: checks it runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.pretrain_steps = SMOKE_STEPS, SMOKE_PRETRAIN_STEPS
    args.tasks = args.tasks.split(",")
    unknown = set(args.tasks) - set(tasks.TASKS)
    if unknown:
        p.error(f"unknown tasks {sorted(unknown)}; choose from {list(tasks.TASKS)}")
    return args


def schedule(lr: float, steps: int):
    """Linear warm-up, then cosine decay to zero."""
    warmup = max(1, int(WARMUP_FRACTION * steps))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))


def next_token_loss(logits, ids, mask):
    """Cross-entropy of the logits of ``ids[:, :-1]`` against ``ids[:, 1:]`` under `mask`."""
    return llama.loss_fn(logits, ids[:, 1:], mask)


# --- 1. the base: full fine-tuning on copy, cached --------------------------------------


def pretrain(model, key, steps: int):
    """Trains every base parameter on `tasks.base_batch`; returns (params, losses, times)."""
    tx = optax.adamw(schedule(PRETRAIN_LR, steps), weight_decay=WEIGHT_DECAY)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, i):
        params, opt_state = state
        ids, mask = tasks.base_batch(jax.random.fold_in(key, i), BATCH, LENGTH)
        loss_of = lambda p: next_token_loss(model.apply(p, ids[:, :-1]), ids, mask)
        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    params = llama.init_params(model.config, key)
    (params, _), losses, times = run_steps(step, (params, tx.init(params)), steps, "base (full FT)")
    return params, losses, times


def cached_base(model, args):
    """Loads the pretrained base from ``--out``, or pretrains and saves it.

    Returns:
      (params, pretraining losses).
    """
    tag = repr(
        (
            model.config,
            args.pretrain_steps,
            args.seed,
            LENGTH,
            BATCH,
            PRETRAIN_LR,
            WARMUP_FRACTION,
            WEIGHT_DECAY,
            tasks.DATA_VERSION,
        )
    )
    path = os.path.join(args.out, f"base-{hashlib.sha1(tag.encode()).hexdigest()[:12]}.npz")
    template = jax.eval_shape(functools.partial(llama.init_params, model.config), jax.random.key(0))
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [jax.tree_util.keystr(kp) for kp, _ in flat]
    if os.path.exists(path) and not args.fresh:
        print(f"base: loaded {shown(path)} (--fresh retrains it)")
        with np.load(path) as f:
            leaves = [jnp.asarray(f[n]) for n in names]
            return jax.tree_util.tree_unflatten(treedef, leaves), list(f[LOSSES])
    key = jax.random.fold_in(jax.random.key(args.seed), BASE_KEY)
    params, losses, times = pretrain(model, key, args.pretrain_steps)
    os.makedirs(args.out, exist_ok=True)
    arrays = dict(zip(names, map(np.asarray, jax.tree.leaves(params))))
    np.savez(path, **arrays, **{LOSSES: np.asarray(losses)})
    print(
        f"base: {args.pretrain_steps} steps of full fine-tuning, median "
        f"{median_ms(times[1:] or times):.1f} ms/step; saved {shown(path)}"
    )
    return params, losses


# --- 2. one adapter per task over the same frozen base ----------------------------------


def make_lora_step(model, tx):
    """One jitted step for every adapter: the task's batch is an argument."""
    lora_apply = jlora.apply(model.apply)

    @functools.partial(jax.jit, donate_argnums=1)
    def step(params, state, ids, mask):
        adapter, opt_state = state
        loss_of = lambda ad: next_token_loss(lora_apply(params, ad, ids[:, :-1]), ids, mask)
        loss, grads = jax.value_and_grad(loss_of)(adapter)  # grads for the adapter only
        updates, opt_state = tx.update(grads, opt_state, adapter)
        return (optax.apply_updates(adapter, updates), opt_state), loss

    return step


def train_adapters(model, params, args, lora_cfg):
    """Trains, saves and reloads one adapter per task; returns (adapters, losses, times)."""
    tx = jlora.loraplus(
        optax.adamw,
        learning_rate=schedule(args.lr, args.steps),
        ratio=LORAPLUS_RATIO,
        weight_decay=WEIGHT_DECAY,
    )
    step = make_lora_step(model, tx)
    batch_of = jax.jit(tasks.task_batch, static_argnums=(1, 2, 3))
    seed_key = jax.random.fold_in(jax.random.key(args.seed), ADAPTER_KEY)
    adapters, losses, times = {}, {}, []
    for t, task in enumerate(args.tasks):
        key = jax.random.fold_in(seed_key, t)
        adapter = jlora.init(key, params, lora_cfg)

        def lora_step(state, i, key=key, task=task):
            ids, mask = batch_of(jax.random.fold_in(key, i), task, BATCH, LENGTH)
            return step(params, state, ids, mask)

        (adapter, _), losses[task], t_steps = run_steps(
            lora_step, (adapter, tx.init(adapter)), args.steps, f"adapter {task}"
        )
        times += t_steps[1:]  # a task's first step compiles
        path = os.path.join(args.out, "adapters", task)
        jlora.save_adapter(path, adapter)
        adapters[task] = jlora.load_adapter(path, params)  # evaluate what is on disk
    print(f"adapters: saved to and reloaded from {shown(os.path.join(args.out, 'adapters'))}")
    return adapters, losses, times


# --- 3. evaluation: one jitted function, every adapter ----------------------------------


def greedy_answers(logits_of, ids):
    """Generates the answer token by token from the prompt; returns (batch, LENGTH)."""
    ids = ids.at[:, LENGTH + 1 :].set(tasks.SEP)  # hide the answer
    for t in range(LENGTH):  # causal: later positions do not affect position LENGTH + t
        nxt = logits_of(ids[:, :-1])[:, LENGTH + t].argmax(-1)
        ids = ids.at[:, LENGTH + 1 + t].set(nxt)
    return ids[:, LENGTH + 1 :]


def scores(logits_of, ids, mask):
    """Returns (teacher-forced answer-token accuracy, greedy exact match, one sample)."""
    hits = (logits_of(ids[:, :-1]).argmax(-1) == ids[:, 1:]) * mask
    answers = greedy_answers(logits_of, ids)
    exact = (answers == ids[:, LENGTH + 1 :]).all(axis=1).mean()
    return float(hits.sum() / mask.sum()), float(exact), tasks.decode(answers[0])


def evaluate(model, params, adapters, args):
    """Scores base and adapters; all adapters go through one jitted function.

    Returns:
      (table rows, the jitted LoRA apply, the jitted base apply).
    """
    traces, lora_apply = [], jlora.apply(model.apply)

    def counted(p, adapter, x):
        traces.append(1)  # runs only when jax traces, not on cached calls
        return lora_apply(p, adapter, x)

    lora_eval, base_eval = jax.jit(counted), jax.jit(model.apply)
    eval_key = jax.random.fold_in(jax.random.key(args.seed), EVAL_KEY)
    rows = []
    for task, adapter in adapters.items():
        ids, mask = tasks.task_batch(eval_key, task, EVAL_BATCH, LENGTH)
        base = scores(lambda x: base_eval(params, x), ids, mask)
        tuned = scores(lambda x, ad=adapter: lora_eval(params, ad, x), ids, mask)
        rows.append((task, tasks.decode(ids[0, :LENGTH]), base, tuned))
    calls = len(adapters) * (LENGTH + 1)
    print(
        f"eval: {calls} calls of one jax.jit(jlora.apply(model.apply)) with "
        f"{len(adapters)} adapter(s): traced {len(traces)} time(s)"
    )
    return rows, lora_eval, base_eval


def check_merge(params, adapter, lora_eval, base_eval, args):
    """Merged base (plain arrays) must give the same logits as the factored adapter."""
    task = args.tasks[0]
    x = tasks.task_batch(jax.random.key(args.seed), task, EVAL_BATCH, LENGTH)[0][:, :-1]
    merged = jlora.merge(params, adapter)  # the base's own apply, no LoRA at all
    diff = jnp.abs(base_eval(merged, x) - lora_eval(params, adapter, x)).max()
    print(
        f"merge: {task} adapter merged into the base; "
        f"max |merged - unmerged| logits = {float(diff):.1e}"
    )


def median_ms(seconds) -> float:
    """Median of per-step wall times, in milliseconds (NaN when there are none)."""
    return 1e3 * float(np.median(seconds)) if len(seconds) else float("nan")


def dir_kb(path: str) -> float:
    """Total size of the files under `path`, in KB."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e3


def report(rows, params, adapter, times, args):
    """Prints the task table and the adapter facts; returns True if every adapter wins."""
    print(
        f"\n{'task':8} {'base acc':>9} {'adapter acc':>12} {'exact match':>12}   "
        f"example: prompt -> base | adapter"
    )
    ok = True
    for task, prompt, (b_acc, _, b_out), (a_acc, a_exact, a_out) in rows:
        ok &= b_acc < BASE_MAX_ACC and a_acc > ADAPTER_MIN_ACC
        print(
            f"{task:8} {b_acc:9.1%} {a_acc:12.1%} {a_exact:12.1%}   {prompt} -> {b_out} | {a_out}"
        )
    print(
        "(acc: answer letters right, teacher-forced; exact match: whole answer right "
        "when generated greedily)"
    )
    n_base, n_lora = llama.count_params(params), llama.count_params(adapter)
    size = dir_kb(os.path.join(args.out, "adapters", args.tasks[0]))
    print(
        f"\ntrainable: {n_lora:,} of {n_base:,} base parameters ({n_lora / n_base:.2%}) "
        f"per adapter; {size:.0f} KB on disk each"
    )
    print(f"median train step: {median_ms(times):.1f} ms (batch {BATCH}, {2 * LENGTH} tokens)")
    return ok


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    model = llama.Llama(llama.LlamaConfig(**MODEL))
    params, base_losses = cached_base(model, args)
    lora_cfg = jlora.LoraConfig.preset(args.preset)
    print(
        f"adapters: preset {args.preset!r} (rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g}, "
        f"{', '.join(lora_cfg.targets)}); LoRA+ ratio {LORAPLUS_RATIO:g}, lr {args.lr:g}"
    )
    adapters, losses, times = train_adapters(model, params, args, lora_cfg)
    rows, lora_eval, base_eval = evaluate(model, params, adapters, args)
    check_merge(params, adapters[args.tasks[0]], lora_eval, base_eval, args)
    ok = report(rows, params, adapters[args.tasks[0]], times, args)
    plot_losses(base_losses, losses, os.path.join(args.out, "loss_curves.png"))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if not args.smoke:
        verdict = "yes" if ok else "NO"
        print(
            f"every adapter beats the base (base < {BASE_MAX_ACC:.0%}, adapter > "
            f"{ADAPTER_MIN_ACC:.0%} answer accuracy): {verdict}"
        )
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
