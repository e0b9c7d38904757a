"""Serve requests tagged with adapter names, loading adapters from disk while generating.

Run: python examples/serve_runtime.py   (uses the main example's cached base and
adapters from examples/.cache, training them first if they are missing, ~2 min)

A fixed number of adapter slots lives beside the base (a ``jlora.stack`` of slot
adapters, every rank zero-padded to the slot rank, each scaling folded into its B so
all slots share one static layout). Requests arrive tagged with a task name; a batch
takes requests whose adapters fit in the slots, reads the missing ones from disk
(jlora or PEFT format) into free or least-recently-used slots, and decodes greedily
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


def padded(adapter, rank: int):
    """``adapter`` at ``rank`` with its scaling folded into B (scale 1): the layout of a slot."""
    def pad(node):
        if node.rank > rank:
            raise jlora.LoraError(f"an adapter of rank {node.rank} does not fit slots of rank "
                                  f"{rank}; start the server with --slot-rank {node.rank}")
        extra = rank - node.rank
        a = jnp.pad(node.a, [(0, 0)] * (node.a.ndim - 1) + [(0, extra)])
        b = jnp.pad(node.b * node.scale, [(0, 0)] * (node.b.ndim - 2) + [(0, extra), (0, 0)])
        return jlora.LoraNode(a=a, b=b, rank=rank, alpha=float(rank), scale=1.0,
                              dropout=0.0, shape=node.shape, stack_axes=node.stack_axes,
                              in_axes=node.in_axes, out_axes=node.out_axes,
                              magnitude=node.magnitude)
    return jax.tree.map(pad, adapter, is_leaf=lambda x: isinstance(x, jlora.LoraNode))


@jax.jit
def write(slots, i, adapter):
    """``slots`` with slot ``i`` holding ``adapter`` (already ``padded``)."""
    TRACES["write"] += 1
    leaves = [s.at[i].set(x) for s, x in zip(jax.tree.leaves(slots), jax.tree.leaves(adapter))]
    return jax.tree.unflatten(jax.tree.structure(slots), leaves)


class Slots:
    """``n`` resident adapters over one base, filled from disk and evicted LRU."""

    def __init__(self, params, like, n: int, rank: int, paths: dict):
        zero = jax.tree.map(jnp.zeros_like, padded(like, rank))
        self.tree, self.rank, self.params, self.paths = jlora.stack([zero] * n), rank, params, paths
        self.n = n
        self.lru = collections.OrderedDict()  # name -> slot, least recently used first

    def _read(self, name):
        path = self.paths[name]
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            return jlora.peft.load(path, self.params), "PEFT"
        return jlora.load_adapter(path, self.params), "jlora"

    def ensure(self, names) -> tuple[dict, list]:
        """Slots for ``names`` (at most ``n`` distinct), loading the missing ones."""
        events = []
        for name in dict.fromkeys(names):
            if name in self.lru:
                self.lru.move_to_end(name)
                continue
            free = sorted(set(range(self.n)) - set(self.lru.values()))
            if free:
                slot = free[0]
            else:  # evict the least recently used adapter this batch does not need
                old = next(k for k in self.lru if k not in names)
                slot = self.lru.pop(old)
                events.append(f"evicted {old} from slot {slot}")
            adapter, fmt = self._read(name)
            self.tree = write(self.tree, jnp.int32(slot), padded(adapter, self.rank))
            self.lru[name] = slot
            events.append(f"loaded {name} ({fmt}) into slot {slot}")
        return {k: self.lru[k] for k in names}, events


def decoder(model, params):
    """Jitted prefill and decode step over the slots, each row through its own slot."""
    run = jlora.apply(model.apply)
    axes = (0, 0, None, 1, None)  # ids, positions, mask, cache (batch on axis 1), index

    @jax.jit
    def prefill(slots, ids, cache, slot_ids):
        TRACES["prefill"] += 1
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
        logits, cache = run(params, slots, ids, pos, None, cache, jnp.int32(0),
                            adapter_ids=slot_ids, example_axes=axes)
        return logits[:, -1].argmax(-1), cache

    @jax.jit
    def step(slots, tok, at, cache, slot_ids):
        TRACES["step"] += 1
        pos = jnp.full(tok.shape, at, jnp.int32)
        logits, cache = run(params, slots, tok, pos, None, cache, at,
                            adapter_ids=slot_ids, example_axes=axes)
        return logits[:, -1].argmax(-1), cache
    return prefill, step


def generate(dec, config, slots, prompts, slot_ids):
    """Greedy answers ``(batch, N)`` for prompts ``(batch, N + 1)`` (prompt + SEP)."""
    prefill, step = dec
    cache = llama.init_cache(config, prompts.shape[0], 2 * N + 1)
    tok, cache = prefill(slots.tree, prompts, cache, slot_ids)
    out = [tok]
    for t in range(N - 1):
        tok, cache = step(slots.tree, tok[:, None], jnp.int32(N + 1 + t), cache, slot_ids)
        out.append(tok)
    return jnp.stack(out, axis=1)


def requests(names, count: int):
    """``count`` requests cycling over the tasks in an uneven order, with their prompts."""
    order = [names[(i * 3 + i // 4) % len(names)] for i in range(count)]
    key = jax.random.key(11)
    prompts = [tasks.task_batch(jax.random.fold_in(key, i), t, 1, N)[0][0]
               for i, t in enumerate(order)]
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
    slots = Slots(params, next(iter(adapters.values())), args.slots, args.slot_rank, paths)
    dec, alone = decoder(model, params), jax.jit(jlora.apply(model.apply))
    rows, queue, timed = [], list(range(len(names))), []  # (tokens, seconds) per batch
    while queue:
        batch = []  # in arrival order, while the batch's adapters fit in the slots
        for i in list(queue):
            if len(batch) < args.batch and len({names[j] for j in batch + [i]}) <= args.slots:
                batch.append(i)
                queue.remove(i)
        where, events = slots.ensure([names[i] for i in batch])
        pad = args.batch - len(batch)  # fixed shapes: idle rows use the base alone (-1)
        ids = jnp.stack([prompts[i][:N + 1] for i in batch] + [prompts[batch[0]][:N + 1]] * pad)
        slot_ids = jnp.array([where[names[i]] for i in batch] + [-1] * pad)
        t0 = time.perf_counter()
        answers = jax.block_until_ready(generate(dec, model.config, slots, ids, slot_ids))
        timed.append((len(batch) * N, time.perf_counter() - t0))
        for row, i in enumerate(batch):
            ref = train_tasks.greedy_answers(
                lambda x, i=i: alone(params, adapters[names[i]], x), prompts[i][None])[0]
            rows.append((i, names[i], where[names[i]], "; ".join(events) or "resident",
                         tasks.decode(answers[row]), bool((answers[row] == ref).all())))
            events = []
    print(f"{len(names)} requests over {len(adapters)} adapters, {args.slots} slots of rank "
          f"{args.slot_rank}, batches of {args.batch}, greedy decode with a KV cache:\n")
    print(f"{'#':>2} {'adapter':8} {'slot':>4} {'answer':10} {'= alone':8} "
          "slots (at the first request of each batch)")
    for i, name, slot, event, answer, same in sorted(rows):
        print(f"{i:2} {name:8} {slot:4} {answer:10} {'yes' if same else 'NO':8} {event}")
    print(f"\n{sum(r[-1] for r in rows)}/{len(rows)} requests equal their adapter run alone; "
          f"traced: prefill {TRACES['prefill']}, step {TRACES['step']}, slot write "
          f"{TRACES['write']}")
    later = timed[1:] or timed  # the first batch compiles
    print(f"{sum(t for t, _ in later) / sum(s for _, s in later):.0f} tokens/s after the "
          f"first batch ({sum(t for t, _ in timed) / sum(s for _, s in timed):.0f} with it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
