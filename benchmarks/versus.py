"""An older jlora against this one, side by side: tracing time and step time.

For a refactor that must not make ``apply`` slower. Checks out ``--old`` (a git
ref) into a temporary worktree and runs the same measurement in a fresh process
for each tree, alternating old and new (``--rounds`` processes each), so that
machine drift hits both alike; ``import jlora`` in each process comes from its
tree (``PYTHONPATH``; each process prints where it got jlora from).

Each process builds an unscanned Llama (tiny config, ``--layers`` layers, Python-loop
layers, LoRA r16 on q,k,v,o, batch 2 x seq 64) and measures, with new functions
each time so that nothing comes from a cache:

- ``trace grad``: ``jax.jit(grad of the LoRA loss).lower(...)``: tracing plus
  interpreting the jaxpr (jlora's part of the first step), seconds;
- ``trace mixed``: the same for a forward with two stacked adapters and
  ``adapter_ids`` (the example-axis analysis runs);
- ``trace mask``: the same for a forward with ``lora_mask`` (the token-axis analysis);
- ``step``: the jitted LoRA gradient step (compiled once), milliseconds.

    python benchmarks/versus.py --old 91ac515            # 4 processes per tree
    python benchmarks/versus.py --old HEAD~3 --rounds 2 --layers 4
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ROWS = ("trace grad", "trace mixed", "trace mask", "step")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def worker(layers: int, repeats: int) -> dict:
    """One process's medians per row (seconds; ``step`` in ms)."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(REPO, "examples"))
    import llama

    import jlora

    cfg = llama.LlamaConfig.named("tiny", num_layers=layers, scan_layers=False)
    model, key = llama.Llama(cfg), jax.random.key(0)
    params = llama.init_params(cfg, key)
    ids = jax.random.randint(key, (2, 65), 0, cfg.vocab_size)
    x, y = ids[:, :-1], ids[:, 1:]
    lcfg = jlora.LoraConfig(rank=16, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    ad = jax.tree.map(lambda v: v + 1e-3, jlora.init(key, params, lcfg))
    two = jlora.stack([ad, jax.tree.map(lambda v: v * 2, ad)])
    which, mask = jnp.array([0, 1]), jnp.ones(x.shape, bool)

    def loss_of():
        f = jlora.apply(lambda p, x: model.apply(p, x))
        return jax.grad(lambda a, p, x: llama.loss_fn(f(p, a, x), y))

    def mixed():
        return jlora.apply(lambda p, x: model.apply(p, x))

    cases = {
        "trace grad": lambda: jax.jit(loss_of()).lower(ad, params, x),
        "trace mixed": lambda: jax.jit(lambda p, a, x, i: mixed()(p, a, x, adapter_ids=i)).lower(
            params, two, x, which
        ),
        "trace mask": lambda: jax.jit(lambda p, a, x, m: mixed()(p, a, x, lora_mask=m)).lower(
            params, ad, x, mask
        ),
    }
    out = {}
    for name, case in cases.items():
        case()  # warm JAX's own per-primitive caches
        out[name] = statistics.median(_timed(case) for _ in range(repeats))
    step = jax.jit(loss_of())
    jax.block_until_ready(step(ad, params, x))
    out["step"] = 1e3 * statistics.median(
        _timed(lambda: jax.block_until_ready(step(ad, params, x))) for _ in range(3 * repeats)
    )
    out["jlora"] = os.path.dirname(os.path.dirname(jlora.__file__))
    return out


def _run(tree: str, layers: int, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, __file__, "--worker", "--layers", str(layers), "--repeats", str(repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=HERE)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", help="the git ref to compare against")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.layers, args.repeats)))
        return
    old = tempfile.mkdtemp()
    subprocess.run(["git", "worktree", "add", "--detach", old, args.old], cwd=REPO, check=True)
    try:
        got: dict = {"old": [], "new": []}
        for r in range(args.rounds):
            order = [("old", old), ("new", REPO)] if r % 2 == 0 else [("new", REPO), ("old", old)]
            for who, tree in order:
                got[who].append(_run(tree, args.layers, args.repeats))
                assert got[who][-1]["jlora"] == tree, got[who][-1]["jlora"]
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", old], cwd=REPO, check=True)
    lines = [
        f"| row | old ({args.old}) | new | new / old (median of per-round ratios) |",
        "|---|---|---|---|",
    ]
    for row in ROWS:
        o, n = [g[row] for g in got["old"]], [g[row] for g in got["new"]]
        ratio = statistics.median(b / a for a, b in zip(o, n, strict=True))
        unit = "ms" if row == "step" else "s"
        lines.append(
            f"| {row} ({unit}) | {statistics.median(o):.3f} ({min(o):.3f}-{max(o):.3f}) "
            f"| {statistics.median(n):.3f} ({min(n):.3f}-{max(n):.3f}) | {ratio:.2f} |"
        )
    print("\n".join(lines))
    print(
        f"\n{args.rounds} processes per tree, alternating; Llama tiny x {args.layers} "
        f"unscanned layers, batch 2 x seq 64, LoRA r16 q,k,v,o; each value a median of "
        f"{args.repeats} (step: {3 * args.repeats}) calls in one process"
    )


if __name__ == "__main__":
    main()
