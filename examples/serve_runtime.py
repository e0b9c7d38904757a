"""Serve requests tagged with adapter names, loading adapters from disk while generating.

Run: python examples/serve_runtime.py   (uses the main example's cached base and
adapters from examples/.cache, training them first if they are missing, ~2 min)

A fixed number of adapter slots lives beside the base (``jlora.Slots``: every rank
zero-padded to the slot rank, each scaling folded into its B, so all slots share one
static layout). Requests arrive tagged with a task name; a batch
takes requests whose adapters fit in the slots; ``slots.batch`` reads the missing ones
from disk (jlora or PEFT format) into free or least-recently-used slots, and decodes greedily
with a KV cache, each row through its own slot (``adapter_ids``). Loading and
evicting write arrays into the slots: nothing is traced again (the trace counts are
printed). Each request's tokens are checked against its adapter run alone, at its own
rank and scaling, without a cache.
"""

import argparse
import collections
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama  # noqa: E402
import serve_many  # noqa: E402
import tasks  # noqa: E402
import train_tasks  # noqa: E402

import jlora  # noqa: E402

N = train_tasks.LENGTH  # prompt letters; the model reads prompt + SEP, then answers N
TRACES = collections.Counter()


def fmt(path) -> str:
    return "PEFT" if os.path.isfile(os.path.join(path, "adapter_config.json")) else "jlora"


def take(slots, names, paths):
    """``slots.batch(names)`` and what it loaded and evicted to get there."""
    before = slots.resident
    tree, ids = slots.batch(names)
    after = slots.resident
    events = [f"evicted {old} from slot {slot}" for old, slot in before.items() if old not in after]
    events += [
        f"loaded {name} ({fmt(paths[name])}) into slot {slot}"
        for name, slot in after.items()
        if name not in before
    ]
    return tree, ids, events


def decoder(model, params):
    """Jitted prefill and decode step over the slots, each row through its own slot."""
    run = jlora.apply(model.apply)
    axes = (0, 0, None, 1, None)  # ids, positions, mask, cache (batch on axis 1), index

    @jax.jit
    def prefill(slots, ids, cache, slot_ids):
        TRACES["prefill"] += 1
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
        logits, cache = run(
            params,
            slots,
            ids,
            pos,
            None,
            cache,
            jnp.int32(0),
            adapter_ids=slot_ids,
            example_axes=axes,
        )
        return logits[:, -1].argmax(-1), cache

    @jax.jit
    def step(slots, tok, at, cache, slot_ids):
        TRACES["step"] += 1
        pos = jnp.full(tok.shape, at, jnp.int32)
        logits, cache = run(
            params, slots, tok, pos, None, cache, at, adapter_ids=slot_ids, example_axes=axes
        )
        return logits[:, -1].argmax(-1), cache

    return prefill, step


def generate(dec, config, tree, prompts, slot_ids):
    """Greedy answers ``(batch, N)`` for prompts ``(batch, N + 1)`` (prompt + SEP)."""
    prefill, step = dec
    cache = llama.init_cache(config, prompts.shape[0], 2 * N + 1)
    tok, cache = prefill(tree, prompts, cache, slot_ids)
    out = [tok]
    for t in range(N - 1):
        tok, cache = step(tree, tok[:, None], jnp.int32(N + 1 + t), cache, slot_ids)
        out.append(tok)
    return jnp.stack(out, axis=1)


def requests(names, count: int):
    """``count`` requests cycling over the tasks in an uneven order, with their prompts."""
    order = [names[(i * 3 + i // 4) % len(names)] for i in range(count)]
    key = jax.random.key(11)
    prompts = [
        tasks.task_batch(jax.random.fold_in(key, i), t, 1, N)[0][0] for i, t in enumerate(order)
    ]
    return order, prompts


def disk_copies(model, params, adapters, out: str) -> dict:
    """Where each adapter is read from: the main example's jlora checkpoints, and PEFT
    files (written here once) for every other task."""
    paths = {}
    for i, (name, ad) in enumerate(adapters.items()):
        paths[name] = os.path.join(out, "adapters", name)
        if i % 2:
            paths[name] = os.path.join(out, "peft", name)
            if not os.path.isdir(paths[name]):
                jlora.peft.save(paths[name], ad)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(train_tasks.HERE, ".cache"))
    p.add_argument("--smoke", action="store_true", help="tiny training: checks it runs")
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--slot-rank", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--requests", type=int, default=12)
    args = p.parse_args(argv)
    model, params, adapters = serve_many.load(args)
    paths = disk_copies(model, params, adapters, args.out)
    names, prompts = requests(list(adapters), args.requests)
    slots = jlora.Slots(
        params, next(iter(adapters.values())), args.slots, rank=args.slot_rank, sources=paths
    )
    dec, alone = decoder(model, params), jax.jit(jlora.apply(model.apply))
    rows, queue, timed = [], list(range(len(names))), []  # (tokens, seconds) per batch
    while queue:
        batch = []  # in arrival order, while the batch's adapters fit in the slots
        for i in list(queue):
            if len(batch) < args.batch and len({names[j] for j in batch + [i]}) <= args.slots:
                batch.append(i)
                queue.remove(i)
        pad = args.batch - len(batch)  # fixed shapes: idle rows use the base alone (None)
        tree, slot_ids, events = take(slots, [names[i] for i in batch] + [None] * pad, paths)
        where = slots.resident
        ids = jnp.stack([prompts[i][: N + 1] for i in batch] + [prompts[batch[0]][: N + 1]] * pad)
        t0 = time.perf_counter()
        answers = jax.block_until_ready(generate(dec, model.config, tree, ids, slot_ids))
        timed.append((len(batch) * N, time.perf_counter() - t0))
        for row, i in enumerate(batch):
            ref = train_tasks.greedy_answers(
                lambda x, i=i: alone(params, adapters[names[i]], x), prompts[i][None]
            )[0]
            rows.append(
                (
                    i,
                    names[i],
                    where[names[i]],
                    "; ".join(events) or "resident",
                    tasks.decode(answers[row]),
                    bool((answers[row] == ref).all()),
                )
            )
            events = []
    print(
        f"{len(names)} requests over {len(adapters)} adapters, {args.slots} slots of rank "
        f"{args.slot_rank}, batches of {args.batch}, greedy decode with a KV cache:\n"
    )
    print(
        f"{'#':>2} {'adapter':8} {'slot':>4} {'answer':10} {'= alone':8} "
        "slots (at the first request of each batch)"
    )
    for i, name, slot, event, answer, same in sorted(rows):
        print(f"{i:2} {name:8} {slot:4} {answer:10} {'yes' if same else 'NO':8} {event}")
    print(
        f"\n{sum(r[-1] for r in rows)}/{len(rows)} requests equal their adapter run alone; "
        f"traced: prefill {TRACES['prefill']}, step {TRACES['step']}, slot write "
        f"{slots.traces}"
    )
    later = timed[1:] or timed  # the first batch compiles
    print(
        f"{sum(t for t, _ in later) / sum(s for _, s in later):.0f} tokens/s after the "
        f"first batch ({sum(t for t, _ in timed) / sum(s for _, s in timed):.0f} with it)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
