"""The weight uses of issue 18 (convolutions, embeddings with a 32000 vocabulary, MoE
experts through ``ragged_dot``): one gradient step of the LoRA adapter (factored),
of the same adapter merged on the fly (``loss(merge(params, adapter))``) and of full
fine-tuning, on this machine. Times are medians (min-max) of interleaved rounds; FLOPs
are XLA's ``cost_analysis()`` of each compiled step. Writes ``results/weight_uses.md``.

    python benchmarks/weight_uses.py            # 7 rounds
    python benchmarks/weight_uses.py --quick    # smaller models, 3 rounds (a smoke run)
"""

import argparse
import os
import platform
import statistics
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
sys.path.insert(0, os.path.dirname(__file__))
import llama  # noqa: E402
import moe  # noqa: E402
from core import timeit_interleaved, write_result  # noqa: E402

import jlora  # noqa: E402


class ConvNet(nn.Module):
    """ResNet-style: 3x3 convs (a residual pair, a strided one), global pool, a head."""

    width: int = 128

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.width, (3, 3), name="stem")(x))
        r = nn.Conv(self.width, (3, 3), name="res")(
            nn.relu(nn.Conv(self.width, (3, 3), name="mid")(x))
        )
        x = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=2, name="down")(x + r))
        return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


def conv_case(quick):
    key, net = jax.random.key(0), ConvNet(32 if quick else 128)
    x = jax.random.normal(key, (2, 32, 32, 3))
    params = net.init(key, x)
    cfg = jlora.LoraConfig(rank=4, targets=("stem", "mid", "res", "down"))
    return params, jlora.init(key, params, cfg, net.apply, x), _mse, net.apply, (x,)


def embed_case(quick):
    cfg = llama.LlamaConfig(
        vocab_size=4000 if quick else 32000,
        hidden_size=128,
        intermediate_size=256,
        num_heads=4,
        num_layers=2,
    )
    model, key = llama.Llama(cfg), jax.random.key(0)
    params = llama.init_params(cfg, key)
    ids = jax.random.randint(key, (2, 33), 0, cfg.vocab_size)
    lcfg = jlora.LoraConfig(rank=16, targets=("embed_tokens", "lm_head"))
    head = lambda logits: llama.loss_fn(logits, ids[:, 1:])
    return (
        params,
        jlora.init(key, params, lcfg, model.apply, ids[:, :-1]),
        head,
        model.apply,
        (ids[:, :-1],),
    )


def moe_case(quick):
    key = jax.random.key(0)
    params = moe.init_params(key, dim=64, hidden=128 if quick else 256)
    x = jax.random.normal(key, (128 if quick else 512, 64))
    cfg = jlora.LoraConfig(rank=4, targets=("w_in", "w_out"))
    return params, jlora.init(key, params, cfg, moe.moe, x), _mse, moe.moe, (x,)


def _mse(y):
    return jnp.mean(jnp.square(y))


def steps(case, ragged_row=False):
    """``{row: (jitted step, args)}`` and the ``explain`` uses of the adapted leaves.

    ``ragged_row``: one more LoRA row, its low-rank products through ``ragged_dot`` as
    off the CPU (here JAX lowers ``ragged_dot`` densely, the input replicated per group),
    against the masked dense products jlora runs on the CPU."""
    params, adapter, head, fn, args = case
    adapter = jax.tree.map(lambda v: v + 1e-3, adapter)  # B != 0: the update is live
    lora = lambda ad, p: head(jlora.apply(fn)(p, ad, *args))
    merged = lambda ad, p: head(fn(jlora.merge(p, ad), *args))
    full = lambda p: head(fn(p, *args))
    out = {
        "LoRA (factored)": (jax.jit(jax.grad(lora)), (adapter, params)),
        "merge on the fly": (jax.jit(jax.grad(merged)), (adapter, params)),
        "full fine-tuning": (jax.jit(jax.grad(full)), (params,)),
    }
    if ragged_row:
        from jlora._src.interpret import grouped

        saved, grouped.DENSE_ON = grouped.DENSE_ON, ()
        try:  # traced and compiled now, while the switch holds
            step = jax.jit(jax.grad(lora)).lower(adapter, params).compile()
        finally:
            grouped.DENSE_ON = saved
        out = {"LoRA, ragged_dot products": (step, (adapter, params)), **out}
    uses = set(sum(jlora.explain(fn, params, adapter, *args).values(), []))
    return out, uses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    opts = ap.parse_args()
    rounds = opts.rounds or (3 if opts.quick else 7)
    lines = [
        "| model | step | median ms (min-max) | ratio to full | XLA GFLOPs |",
        "|---|---|---|---|---|",
    ]
    for name, make in (
        ("conv net", conv_case),
        ("Llama, embed + lm_head", embed_case),
        ("MoE (ragged_dot)", moe_case),
    ):
        calls, uses = steps(make(opts.quick), ragged_row=make is moe_case)
        times = timeit_interleaved(calls, rounds)
        compiled = lambda f, a: f if hasattr(f, "cost_analysis") else f.lower(*a).compile()
        flops = {k: compiled(f, a).cost_analysis()["flops"] / 1e9 for k, (f, a) in calls.items()}
        full = statistics.median(times["full fine-tuning"])
        for row, ts in times.items():
            med = statistics.median(ts)
            lines.append(
                f"| {name} | {row} | {med:.1f} ({min(ts):.1f}-{max(ts):.1f}) | "
                f"{med / full:.2f} | {flops[row]:.3f} |"
            )
        print(name, "uses:", sorted(uses))
    table = "\n".join(lines)
    print(table)
    note = (
        f"\n\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__}, {rounds} interleaved rounds"
    )
    write_result(
        "weight_uses" + ("_quick" if opts.quick else ""),
        "python benchmarks/weight_uses.py" + (" --quick" if opts.quick else ""),
        table,
        note,
    )


if __name__ == "__main__":
    main()
