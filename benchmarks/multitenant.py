"""Multi-tenant training: n adapters trained together in mixed batches vs one at a time.

Train steps (forward + backward + LoRA+ AdamW) of the bench-size example model (h512,
4 layers, vocab 8000), LoRA r16 on q,k,v,o, every row on the same n x 2 sequences of
128 tokens, medians over interleaved rounds:

- ``together n``: one step of ``jlora.stack`` of n adapters on the mixed batch
  (example i trains adapter ``i % n``; each adapter's loss is its own examples' mean);
- ``sequential n``: n steps of the single-adapter step, one adapter's 2 sequences each
  (the same compiled function throughout);
- ``one adapter``: one step of a single adapter on the whole batch (the floor: the
  same tokens with no per-example factors).

Run from the repo root: ``python benchmarks/multitenant.py`` (writes
``benchmarks/results/multitenant.md``; ``--quick`` for a tiny smoke run).
"""

import argparse
import os
import platform
import statistics
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import llama  # noqa: E402
from core import timeit_interleaved, write_result  # noqa: E402

import jlora  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _step(model, params, tx, n, ids=None):
    def loss(ad, batch):
        kw = {} if ids is None else {"adapter_ids": ids}
        logits = jlora.apply(model.apply)(params, ad, batch[:, :-1], **kw)
        per = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(-1)
        return per.mean() if ids is None else sum(per[i::n].mean() for i in range(n))

    @jax.jit
    def step(ad, state, batch):
        grads = jax.grad(loss)(ad, batch)
        updates, state = tx.update(grads, state, ad)
        return optax.apply_updates(ad, updates), state

    return step


def build(quick: bool, n: int):
    cfg = llama.LlamaConfig.named("tiny" if quick else "bench")
    per, seq = 2, (32 if quick else 128)
    model, key = llama.Llama(cfg), jax.random.key(0)
    params = llama.init_params(cfg, key)
    batch = jax.random.randint(key, (n * per, seq + 1), 0, cfg.vocab_size)
    lcfg = jlora.LoraConfig(rank=16, alpha=32.0, targets=TARGETS)
    ads = [
        jax.tree.map(
            lambda v, i=i: v + 1e-3 * (i + 1), jlora.init(jax.random.fold_in(key, i), params, lcfg)
        )
        for i in range(n)
    ]
    tx = jlora.loraplus(optax.adamw, learning_rate=1e-4, weight_decay=0.01)
    stacked, states = jlora.stack(ads), [tx.init(ad) for ad in ads]
    together = _step(model, params, tx, n, jnp.arange(n * per) % n)
    alone = _step(model, params, tx, n)
    rows = {
        f"together {n}": (together, (stacked, tx.init(stacked), batch)),
        f"sequential {n}": (
            lambda b: [alone(ads[i], states[i], b[i::n]) for i in range(n)][-1],
            (batch,),
        ),
        "one adapter": (alone, (ads[0], states[0], batch)),
    }
    return rows, (cfg, per, seq)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--n", type=int, default=8)
    args = parser.parse_args()
    rows, (cfg, per, seq) = build(args.quick, args.n)
    times = timeit_interleaved(rows, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    seq_row = f"sequential {args.n}"
    lines = ["| row | median ms (min-max) | time / sequential |", "|---|---|---|"]
    for name, ts in times.items():
        lines.append(
            f"| {name} | {med[name]:.1f} ({min(ts):.1f}-{max(ts):.1f}) | "
            f"{med[name] / med[seq_row]:.2f} |"
        )
    table = "\n".join(lines)
    note = (
        f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.devices()[0].platform}; model h{cfg.hidden_size} L{cfg.num_layers} vocab "
        f"{cfg.vocab_size}; {args.n} adapters x {per} sequences of {seq} tokens per row; "
        f"LoRA r16 a32 q,k,v,o, LoRA+ AdamW; {args.repeats} interleaved rounds"
    )
    print(table + "\n\n" + note)
    if not args.quick:
        write_result(
            "multitenant",
            f"python benchmarks/multitenant.py --repeats {args.repeats}",
            f"{table}\n\n{note}",
        )


if __name__ == "__main__":
    main()
