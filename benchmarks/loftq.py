"""LoftQ against plain QLoRA on the main example's pretrained base.

The base is ``examples/train_tasks.py``'s (its cache, or 400 steps of pretraining on
``copy``). Every linear layer is NF4-quantized and adapted at rank 16, alpha 32: plain
QLoRA (``jlora.quantize``, B = 0) against ``init="loftq"`` with 1 and 5 iterations.
Rows: the Frobenius error of the adapted weights against the float ones
(``||W - (dequant(Q) + s A B)||`` over all adapted matrices, and its ratio to plain
NF4's), the loss of the untrained adapter on held-out batches of the base's own task
(the float base's loss for reference) and how far its next-token distributions are
from the float base's (mean KL divergence): where a QLoRA run starts.

Run from the repo root: ``python benchmarks/loftq.py`` (writes
``benchmarks/results/loftq.md``).
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import llama  # noqa: E402
import tasks  # noqa: E402
import train_tasks  # noqa: E402
from core import write_result  # noqa: E402

import jlora  # noqa: E402

RANK, ALPHA = 16, 32.0
TARGETS = jlora._src.config.ALL_LINEAR


def _error(params, qbase, adapter) -> float:
    """``||W - W_adapted||_F`` over the adapted matrices (NF4 dequantized)."""
    merged = jlora.merge(qbase, adapter)
    paths = jlora._src.adapter.adapter_nodes(adapter)
    sq = 0.0
    for (kp, w), (_, m) in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree_util.tree_flatten_with_path(merged)[0],
    ):
        if jlora._src.targets.path_str(kp) in paths:
            sq += float(jnp.sum((w.astype(jnp.float32) - m.astype(jnp.float32)) ** 2))
    return float(np.sqrt(sq))


def _held_out():
    return [
        tasks.base_batch(jax.random.fold_in(jax.random.key(2), i), 256, train_tasks.LENGTH)
        for i in range(4)
    ]


def _start(model, params, qbase, adapter) -> tuple[float, float]:
    """The untrained adapter's held-out loss on the base's task, and the mean KL divergence
    of its next-token distributions from the float base's (nats per token)."""
    apply = jlora.apply(model.apply)
    loss = kl = 0.0
    for ids, mask in _held_out():
        logits = apply(qbase, adapter, ids[:, :-1])
        ref = jax.nn.log_softmax(model.apply(params, ids[:, :-1]))
        loss += float(train_tasks.next_token_loss(logits, ids, mask))
        kl += float(jnp.mean(jnp.sum(jnp.exp(ref) * (ref - jax.nn.log_softmax(logits)), -1)))
    return loss / len(_held_out()), kl / len(_held_out())


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    model = llama.Llama(llama.LlamaConfig(**train_tasks.MODEL))
    params, _ = train_tasks.cached_base(model, train_tasks.parse_args([]))
    key = jax.random.key(0)
    rows = {}
    plain_q = jlora.quantize(params, targets=TARGETS, compute_dtype=jnp.float32)
    plain = jlora.init(key, plain_q, jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS))
    rows["plain QLoRA (NF4, B = 0)"] = (plain_q, plain)
    for iters in (1, 5):
        cfg = jlora.LoraConfig(
            rank=RANK, alpha=ALPHA, targets=TARGETS, init="loftq", loftq_iter=iters
        )
        adapter, qbase = jlora.init_with_base(key, params, cfg)
        rows[f"LoftQ, {iters} iteration(s)"] = (qbase, adapter)
    zero = jax.tree.map(jnp.zeros_like, plain)
    float_loss, _ = _start(model, params, params, zero)
    plain_err = _error(params, plain_q, plain)
    lines = [
        "| init | weight error (Frobenius) | / plain NF4 | loss at step 0 | "
        "KL from the float base at step 0 (nats/token) |",
        "|---|---|---|---|---|",
        f"| float base (no quantization) | 0 | - | {float_loss:.5f} | 0 |",
    ]
    for name, (qbase, adapter) in rows.items():
        err = _error(params, qbase, adapter)
        loss, kl = _start(model, params, qbase, adapter)
        lines.append(f"| {name} | {err:.4f} | {err / plain_err:.3f} | {loss:.5f} | {kl:.2e} |")
    table = "\n".join(lines) + (
        f"\n\nthe main example's base (hidden {model.config.hidden_size}, "
        f"{model.config.num_layers} layers), rank {RANK}, alpha {ALPHA:g}, all linear layers "
        "NF4 (block 64, double quantization); 4 held-out batches of 256 of its own task"
    )
    print(table)
    write_result("loftq", "python benchmarks/loftq.py", table, f" (jax {jax.__version__}, CPU)")


if __name__ == "__main__":
    main()
