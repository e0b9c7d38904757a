"""XLA cost_analysis FLOPs of one gradient step: LoRA / DoRA / merge-on-the-fly vs full FT.

Deterministic; ``tests/test_flops.py`` asserts on the same function. Run from the
repo root: ``python benchmarks/flops.py`` (writes ``benchmarks/results/flops.md``).
XLA counts a loop body once, so the unscanned rows are the true totals.
"""

import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import llama  # noqa: E402
from core import write_result  # noqa: E402

import jlora  # noqa: E402

RANK, BATCH, SEQ = 16, 2, 64


def _flops(f, *args) -> float:
    return jax.jit(f).lower(*args).compile().cost_analysis()["flops"]


def flop_ratios(scan: bool, dora: bool) -> dict:
    """Bench-size Llama, all seven linear layers at r=16: step FLOPs over full fine-tuning."""
    cfg = llama.LlamaConfig.named("bench", scan_layers=scan)
    model = llama.Llama(cfg)
    key = jax.random.key(0)
    ids = jax.random.randint(key, (BATCH, SEQ + 1), 0, cfg.vocab_size)
    params = llama.init_params(cfg, key)
    adapter = jlora.init(
        key, params, jlora.LoraConfig.preset("complex", rank=RANK, alpha=2.0 * RANK, dora=dora)
    )
    full = lambda p: llama.loss_fn(model.apply(p, ids[:, :-1]), ids[:, 1:])
    lora = lambda ad: llama.loss_fn(jlora.apply(model.apply)(params, ad, ids[:, :-1]), ids[:, 1:])
    full_flops = _flops(jax.grad(full), params)
    uses = set(sum(jlora.explain(model.apply, params, adapter, ids).values(), []))
    return dict(
        uses=uses,
        lora=_flops(jax.grad(lora), adapter) / full_flops,
        merge_on_the_fly=_flops(jax.grad(lambda ad: full(jlora.merge(params, ad))), adapter)
        / full_flops,
    )


def main():
    lines = [
        "| layers | adapter | adapter step / full | merge-on-the-fly step / full |",
        "|---|---|---|---|",
    ]
    for scan in (True, False):
        for dora in (False, True):
            r = flop_ratios(scan, dora)
            lines.append(
                f"| {'scanned' if scan else 'unscanned'} | {'DoRA' if dora else 'LoRA'}"
                f" | {r['lora']:.3f} | {r['merge_on_the_fly']:.3f} |"
            )
    table = "\n".join(lines)
    print(table)
    write_result(
        "flops",
        "python benchmarks/flops.py",
        table,
        f" (jax {jax.__version__}; batch {BATCH} x seq {SEQ}, r{RANK}, q,k,v,o,gate,up,down)",
    )


if __name__ == "__main__":
    main()
