"""Serve many adapters over one base: one batch whose examples each pick their adapter.

Run: python examples/serve_many.py   (uses the main example's cached base and
adapters from examples/.cache, training them first if they are missing, ~2 min)

The four task adapters of ``train_tasks.py`` are stacked with ``jlora.stack``;
a single jitted call of ``jlora.apply(model.apply)(params, stacked, ids,
adapter_ids=...)`` then answers a batch where every example asks a different
task (id -1: the base alone, which only copies), decoding greedily.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama  # noqa: E402
import tasks  # noqa: E402
import train_tasks  # noqa: E402

import jlora  # noqa: E402


def load(args):
    """The main example's base and its adapters (trained now if not cached)."""
    argv = ["--out", args.out] + (["--smoke"] if args.smoke else [])
    targs = train_tasks.parse_args(argv)
    model = llama.Llama(llama.LlamaConfig(**train_tasks.MODEL))
    folder = os.path.join(args.out, "adapters")
    if not all(os.path.isdir(os.path.join(folder, t)) for t in targs.tasks):
        print("adapters not cached: running the main example first")
        train_tasks.main(argv)
    params, _ = train_tasks.cached_base(model, targs)
    adapters = {t: jlora.load_adapter(os.path.join(folder, t), params) for t in targs.tasks}
    return model, params, adapters


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(train_tasks.HERE, ".cache"))
    p.add_argument("--smoke", action="store_true", help="tiny training: checks it runs")
    args = p.parse_args(argv)
    model, params, adapters = load(args)
    names = list(adapters)
    stacked = jlora.stack(adapters.values())

    # one request per task, twice, plus two for the base alone
    asks = names + ["base"] + names[::-1] + ["base"]
    key = jax.random.key(7)
    rows = []
    for i, task in enumerate(asks):
        want = "copy" if task == "base" else task
        ids, _ = tasks.task_batch(jax.random.fold_in(key, i), want, 1, train_tasks.LENGTH)
        rows.append(ids[0])
    ids = jnp.stack(rows)
    adapter_ids = jnp.array([names.index(t) if t in names else -1 for t in asks])

    serve = jax.jit(jlora.apply(model.apply))
    logits_of = lambda x: serve(params, stacked, x, adapter_ids=adapter_ids)
    answers = train_tasks.greedy_answers(logits_of, ids)
    n = train_tasks.LENGTH
    print(
        f"one batch of {len(asks)} requests over {len(names)} stacked adapters "
        f"(ranks {stacked_ranks(stacked)}), one jitted call per generated token:\n"
    )
    print(f"{'#':>2} {'adapter':8} {'prompt':10} {'answer':10} {'expected':10}")
    right = 0
    for i, task in enumerate(asks):
        got, exp = tasks.decode(answers[i]), tasks.decode(ids[i, n + 1 :])
        right += got == exp
        print(
            f"{i:2} {task:8} {tasks.decode(ids[i, :n]):10} {got:10} {exp:10} "
            f"{'ok' if got == exp else 'x'}"
        )
    print(
        f"\n{right}/{len(asks)} answers exact (the base alone, id -1, copies: what it "
        "was pretrained to do)"
    )
    return 0


def stacked_ranks(stacked) -> str:
    node = next(iter(jlora.adapter_nodes(stacked).values()))
    return ",".join(map(str, node.ranks))


if __name__ == "__main__":
    sys.exit(main())
