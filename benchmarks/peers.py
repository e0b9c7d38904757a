"""jlora against the libraries a user would pick instead, side by side in one run.

Each implementation runs in its own process (``--impl NAME`` prints JSON) on the
same Llama config (hidden 512, intermediate 1408, 4 layers, 8 heads, vocab 8000,
batch 4 x seq 256, fp32, LoRA r16 alpha 32 on q,k,v,o, dropout 0) and the same
weights; the driver prints one table of medians (min-max) and ratios. Rows:
base forward, LoRA forward (unmerged), merged forward, LoRA train step (forward,
backward, AdamW on the adapter), full fine-tuning step, peak RSS.

Run from the repo root: ``python benchmarks/peers.py`` (writes
``benchmarks/results/peers.md``). Implementations: jlora; merge-on-the-fly
(``model.apply(jlora.merge(params, adapter))``, the naive functional baseline);
Hugging Face PEFT on torch (2 threads; needs the ``interop`` extra); Flax NNX
``nnx.LoRALinear``; qwix's LoRA on the same Linen model; lorax (jax-lorax 0.3.1),
which does not run on current JAX (it imports ``jax.linear_util``), in its own venv
with JAX 0.4.23: ``benchmarks/setup_lorax.sh`` first (or set ``$LORAX_PYTHON``).
"""

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
IMPLS = ("jlora", "merge_on_the_fly", "peft", "nnx", "qwix", "lorax")
#: lorax needs JAX <= 0.4.23: its own venv (benchmarks/setup_lorax.sh) or $LORAX_PYTHON.
LORAX_PYTHON = os.environ.get("LORAX_PYTHON", os.path.join(HERE, ".venv-lorax", "bin", "python"))
ROWS = (
    "base_forward",
    "lora_forward",
    "merged_forward",
    "lora_step",
    "frozen_step",
    "full_step",
    "all_linear_step",
    "dora_step",
    "qlora_step",
    *(f"qlora_{q}_step" for q in ("int8", "int4", "mxfp4", "nvfp4", "mxfp8")),
    "mixed_4_forward",
)
#: The QLoRA base formats both jlora and qwix have (qwix's ``weight_qtype``; int4 with a
#: tile of 128, the block-scaled formats with their own blocks of 32 or 16).
QFORMATS = ("int8", "int4", "mxfp4", "nvfp4", "mxfp8")
RANK, ALPHA, TARGETS = 16, 32.0, ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = TARGETS + ("gate_proj", "up_proj", "down_proj")
BATCH, SEQ, LR = 4, 256, 2e-4


def config():
    import llama

    return llama.LlamaConfig.named("bench", scan_layers=False)


def base_params():
    import jax
    import llama

    return llama.init_params(config(), jax.random.key(0))


def batch():
    import numpy as np

    return np.random.default_rng(0).integers(0, config().vocab_size, (BATCH, SEQ + 1))


def timed(calls: dict, repeats: int) -> dict:
    """Per row, ms per call after two warm-up calls, rows interleaved: every round runs
    each row once, in its own seeded random order (as ``core.timeit_interleaved``)."""
    for f in calls.values():
        f()
        f()
    times = {k: [] for k in calls}
    for r in range(repeats):
        order = list(calls)
        random.Random(r).shuffle(order)
        for k in order:
            f = calls[k]
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def run_jax(impl: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import llama

    import jlora

    sys.path.insert(0, HERE)
    from core import steps

    model, params = llama.Llama(config()), base_params()
    ids = jnp.asarray(batch())
    make = lambda p, i=1, targets=TARGETS, **kw: jax.tree.map(  # B != 0, as after training
        lambda v: v + 1e-3,
        jlora.init(
            jax.random.key(i), p, jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets, **kw)
        ),
    )
    adapter = make(params)
    rows = steps(model, params, ids, {False: adapter, True: make(params, dora=True)})
    if impl == "merge_on_the_fly":
        mof = jax.jit(lambda p, ad, x: model.apply(jlora.merge(p, ad), x))
        rows = dict(
            rows,
            lora_forward=(mof, rows["lora_forward"][1]),
            lora_step=rows["merge_on_the_fly_step"],
        )
        rows.pop("dora_step")
        rows.pop("frozen_step")
    else:  # extra rows: all seven linear layers, an NF4 base (fp32 compute), 4 adapters
        step = rows["lora_step"][0]
        wide = make(params, targets=ALL_LINEAR)
        rows["all_linear_step"] = (step, (wide, optax_init(wide), params))
        nf4 = jlora.quantize(params, compute_dtype=jnp.float32)
        qa = make(nf4)
        rows["qlora_step"] = (step, (qa, optax_init(qa), nf4))
        for qtype in QFORMATS:  # qwix's weight_qtype, tile (group) 128 for int4
            qp = jlora.quantize(params, qtype=qtype, compute_dtype=jnp.float32)
            qa = make(qp)
            rows[f"qlora_{qtype}_step"] = (step, (qa, optax_init(qa), qp))
        stacked = jlora.stack([make(params, i) for i in range(4)])
        mixed = jax.jit(lambda p, st, x, i: jlora.apply(model.apply)(p, st, x, adapter_ids=i))
        rows["mixed_4_forward"] = (mixed, (params, stacked, ids[:, :-1], jnp.arange(4)))
    calls = {
        k: (lambda f=f, a=a: jax.block_until_ready(f(*a)))
        for k, (f, a) in rows.items()
        if k in ROWS
    }
    mb = {k: xla_mb(f, *a) for k, (f, a) in rows.items() if k.startswith("qlora_")}
    return dict(times=timed(calls, repeats), xla_mb=mb)


def xla_mb(f, *args) -> float:
    """MB XLA's ``memory_analysis()`` gives a jitted call: its arguments and temporaries
    (the peak a step needs beyond the code, deterministic)."""
    m = f.lower(*args).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.temp_size_in_bytes) / 2**20


def optax_init(tree):
    import optax

    return optax.adamw(LR).init(tree)  # the same optimizer as core.steps


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(impl: str, repeats: int) -> None:
    if impl in ("jlora", "merge_on_the_fly"):
        return print(json.dumps(dict(run_jax(impl, repeats), rss_mb=peak_rss_mb())))
    elif impl == "peft":
        from peer_torch import run

        times = run(repeats)
    elif impl == "lorax":
        from peer_lorax import run

        times = run(repeats)
    elif impl == "nnx":
        from peer_nnx import run

        times = run(repeats)
    else:
        from peer_qwix import run

        return print(json.dumps(dict(run(repeats), rss_mb=peak_rss_mb())))
    print(json.dumps(dict(times=times, rss_mb=peak_rss_mb())))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=IMPLS)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", nargs="+", default=list(IMPLS))
    ap.add_argument("--passes", type=int, default=2)
    args = ap.parse_args()
    if args.impl:
        return child(args.impl, args.repeats)
    results: dict = {}
    for _ in range(args.passes):  # passes over all implementations: drift hits each alike
        for impl in args.only:
            results[impl] = _merge(results.get(impl), _child_run(impl, args.repeats))
            print(impl, "done", flush=True)
    text = table(results, args.repeats * args.passes)
    print(text)
    only = "" if args.only == list(IMPLS) else " --only " + " ".join(args.only)
    name = "peers" + only.replace(" --only ", "_").replace(" ", "_")
    with open(os.path.join(HERE, "results", name + ".md"), "w") as f:
        f.write(
            f"`python benchmarks/peers.py{only} --repeats {args.repeats} "
            f"--passes {args.passes}` "
            f"({platform.machine()}, {os.cpu_count()} cores, CPU; torch "
            f"{_version('torch')}, peft {_version('peft')}, jax {_version('jax')}, flax "
            f"{_version('flax')})\n\n{text}\n"
        )


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _child_run(impl: str, repeats: int):
    python = LORAX_PYTHON if impl == "lorax" else sys.executable
    if not os.path.exists(python):
        return "not run: no venv with JAX 0.4.23 (run benchmarks/setup_lorax.sh)"
    proc = subprocess.run(
        [python, __file__, "--impl", impl, "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        cwd=HERE,
    )
    if proc.returncode:
        return f"failed: {proc.stderr.strip().splitlines()[-1][:120]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _merge(old, new):
    """Pool the timings of two passes (a failure in either is reported)."""
    if old is None or not isinstance(new, dict):
        return new
    if not isinstance(old, dict):
        return old
    times = {k: old["times"][k] + new["times"][k] for k in old["times"]}
    return dict(new, times=times, rss_mb=max(old["rss_mb"], new["rss_mb"]))


def table(results: dict, repeats: int) -> str:
    ok = {k: v for k, v in results.items() if isinstance(v, dict)}
    med = {k: {r: statistics.median(t) for r, t in v["times"].items()} for k, v in ok.items()}
    head = "| row | " + " | ".join(ok) + " |"
    lines = [head, "|---" * (len(ok) + 1) + "|"]
    for row in ROWS:
        cells = [
            f"{med[k][row]:.0f} ({min(ok[k]['times'][row]):.0f}-{max(ok[k]['times'][row]):.0f})"
            if row in med[k]
            else "-"
            for k in ok
        ]
        lines.append(f"| {row} ms | " + " | ".join(cells) + " |")
    ratio = lambda k, a, b: f"{med[k][a] / med[k][b]:.2f}"
    lines.append(
        "| LoRA fwd / base fwd | "
        + " | ".join(ratio(k, "lora_forward", "base_forward") for k in ok)
        + " |"
    )
    lines.append(
        "| LoRA step / base fwd | "
        + " | ".join(ratio(k, "lora_step", "base_forward") for k in ok)
        + " |"
    )
    lines.append(
        "| LoRA step / frozen step | "
        + " | ".join(
            ratio(k, "lora_step", "frozen_step") if "frozen_step" in med[k] else "-" for k in ok
        )
        + " |"
    )
    if "jlora" in med:
        lines.append(
            "| LoRA step / jlora's | "
            + " | ".join(f"{med[k]['lora_step'] / med['jlora']['lora_step']:.2f}" for k in ok)
            + " |"
        )
    lines.append("| peak RSS MB | " + " | ".join(f"{ok[k]['rss_mb']:.0f}" for k in ok) + " |")
    for q in ("nf4", *QFORMATS):  # XLA's bytes of each QLoRA step, where a peer has it
        row = "qlora_step" if q == "nf4" else f"qlora_{q}_step"
        if any(row in ok[k].get("xla_mb", {}) for k in ok):
            cells = [
                f"{ok[k]['xla_mb'][row]:.0f}" if row in ok[k].get("xla_mb", {}) else "-" for k in ok
            ]
            lines.append(f"| {row} XLA MB | " + " | ".join(cells) + " |")
    failed = [f"{k}: {v}" for k, v in results.items() if not isinstance(v, dict)]
    note = (
        f"\n\nmedians (min-max) of {repeats} timed calls per row and implementation, "
        "rows interleaved within a process, each implementation in its own process, "
        f"the implementations run in turn, pass after pass; {os.cpu_count()} cores"
    )
    return "\n".join(lines) + note + ("\n" + "\n".join(failed) if failed else "")


if __name__ == "__main__":
    main()
