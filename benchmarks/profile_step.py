"""Where a train step's time goes: XLA CPU op times from ``jax.profiler``, by kind.

Profiles the LoRA step (r16 on q,k,v,o, and on all linear layers) and the frozen
floor (only the RMSNorm weights train) of ``core.steps`` on the peers config
(hidden 512, 4 unscanned layers, batch 4 x seq 256; in parentheses the difference
from the floor) and sums each executed HLO op's time into: base matmuls,
attention (batched dots), low-rank matmuls (a dot with a rank-sized axis) and other
(elementwise, reductions, copies). The split comes from the compiled HLO, so it is
exact about what each op is. Then times the LoRA step with jlora's VJP for the
two low-rank products against JAX's own VJP of the same einsums. Run from the
repo root: ``python benchmarks/profile_step.py`` (writes ``benchmarks/results/profile_step.md``).
"""

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import llama  # noqa: E402
from core import steps, write_result  # noqa: E402

import jlora  # noqa: E402

RANK, CALLS = 16, 5
KINDS = ("base matmul", "attention", "low-rank matmul", "other")


def op_kinds(hlo: str) -> dict:
    """``{op name: kind}`` for the ENTRY computation's ops, from the compiled HLO text."""
    bodies, name = collections.defaultdict(list), None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%(\S+) ", line)
        if head:
            name = "ENTRY" if head.group(1) else head.group(2)
        elif name:
            bodies[name].append(line)

    def dots(lines, seen=()):
        found = []
        for line in lines:
            if re.search(r" dot\(", line):
                found.append(line)
            for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line):
                if callee not in seen:
                    found += dots(bodies[callee], seen + (callee,))
        return found

    shape = {
        m.group(1): tuple(int(d) for d in m.group(2).split(",") if d)
        for m in re.finditer(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo)
    }
    kinds = {}
    for line in bodies["ENTRY"]:
        m = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
        if not m:
            continue
        found = dots([line])
        shapes = [
            shape.get(n, ())
            for d in found
            for n in re.findall(r"%([\w.\-]+)", d.split(" dot(", 1)[1].split(")")[0])
        ]
        if not found:
            kinds[m.group(1)] = "other"
        elif any("lhs_batch_dims" in d for d in found):
            kinds[m.group(1)] = "attention"
        elif any(RANK in s for s in shapes):
            kinds[m.group(1)] = "low-rank matmul"
        else:
            kinds[m.group(1)] = "base matmul"
    return kinds


def profile(f, args) -> dict:
    """Median ms per kind over ``CALLS`` traced calls (after a warm-up), and wall ms."""
    kinds = op_kinds(f.lower(*args).compile().as_text())
    jax.block_until_ready(f(*args))
    per_call = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(CALLS):
            with jax.profiler.trace(os.path.join(tmp, str(i)), create_perfetto_trace=True):
                jax.block_until_ready(f(*args))
            path = glob.glob(
                os.path.join(tmp, str(i), "**", "*perfetto_trace.json.gz"), recursive=True
            )[0]
            events = json.load(gzip.open(path))["traceEvents"]
            ms = dict.fromkeys(KINDS, 0.0)
            for e in events:
                op = e.get("args", {}).get("hlo_op")
                if e.get("ph") == "X" and op in kinds:
                    ms[kinds[op]] += e["dur"] / 1e3
            per_call.append(ms)
    return {k: statistics.median(c[k] for c in per_call) for k in KINDS}


def vjp_ab(model, params, ids, adapters: dict, frozen, repeats: int = 21) -> str:
    """Step time with jlora's VJP for ``x A`` and ``(x A) B`` vs JAX's own, and the frozen
    floor, interleaved in one process."""
    import jax.numpy as jnp
    import optax
    from core import timeit_interleaved, train_step

    from jlora._src.interpret import dot as factored

    x, y = ids[:, :-1], ids[:, 1:]
    loss = lambda ad, p: llama.loss_fn(jlora.apply(model.apply)(p, ad, x), y)
    tx, calls, ours = optax.adamw(2e-4), {"frozen": frozen}, factored._thin_product
    try:
        for variant in ("jlora's VJP", "JAX's VJP"):
            if variant == "JAX's VJP":  # the plain einsums, differentiated by JAX
                factored._thin_product = lambda spec, prec, t, f: jnp.einsum(
                    spec, t, f, precision=prec
                )
            for name, ad in adapters.items():
                step, args = train_step(loss, tx), (ad, tx.init(ad), params)
                jax.block_until_ready(step(*args))  # traced now, with this variant
                calls[(name, variant)] = (step, args)
    finally:
        factored._thin_product = ours
    flops = {k: f.lower(*a).compile().cost_analysis()["flops"] for k, (f, a) in calls.items()}
    times = timeit_interleaved(calls, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    cell = lambda k: f"{med[k]:.0f} ({min(times[k]):.0f}-{max(times[k]):.0f})"
    lines = [
        "| targets | jlora's VJP ms | JAX's VJP ms | ratio | jlora / frozen floor | "
        "JAX's / frozen floor | jlora's XLA FLOPs / floor's |",
        "|---" * 7 + "|",
    ]
    for name in adapters:
        a, b = (name, "jlora's VJP"), (name, "JAX's VJP")
        lines.append(
            f"| {name} | {cell(a)} | {cell(b)} | {med[a] / med[b]:.2f} | "
            f"{med[a] / med['frozen']:.3f} | {med[b] / med['frozen']:.3f} | "
            f"{flops[a] / flops['frozen']:.3f} |"
        )
    return "\n".join(lines) + (
        f"\n\nLoRA steps and the frozen floor ({cell('frozen')} ms), "
        f"medians (min-max) of {repeats} interleaved rounds"
    )


def main():
    cfg = llama.LlamaConfig.named("bench", scan_layers=False)
    model, params = llama.Llama(cfg), llama.init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (4, 257), 0, cfg.vocab_size)
    lcfg = jlora.LoraConfig(rank=RANK, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    ad = jax.tree.map(lambda v: v + 1e-3, jlora.init(jax.random.key(2), params, lcfg))
    wide_t = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    wide = jax.tree.map(
        lambda v: v + 1e-3,
        jlora.init(jax.random.key(2), params, dataclasses.replace(lcfg, targets=wide_t)),
    )
    # rank 1: the same passes over full-size activations, almost none of the FLOPs; what
    # it costs over the floor no faster thin-matmul kernel can remove
    thin = jax.tree.map(
        lambda v: v + 1e-3,
        jlora.init(
            jax.random.key(2), params, dataclasses.replace(lcfg, rank=1, alpha=2.0, targets=wide_t)
        ),
    )
    rows = steps(model, params, ids, {False: ad, True: wide})  # dora_step: all linear, LoRA
    rows["all_linear_step"] = rows.pop("dora_step")
    out = {name: profile(*rows[name]) for name in ("lora_step", "all_linear_step", "frozen_step")}
    ab = vjp_ab(
        model,
        params,
        ids,
        {"q,k,v,o": ad, "all linear": wide, "all linear, rank 1": thin},
        rows["frozen_step"],
    )
    lines = [
        "| op kind | lora_step (q,k,v,o) ms | all_linear_step ms | frozen_step ms |",
        "|---|---|---|---|",
    ]
    for k in KINDS + ("sum",):
        a, w, b = (sum(out[s].values()) if k == "sum" else out[s][k] for s in out)
        lines.append(f"| {k} | {a:.0f} ({a - b:+.0f}) | {w:.0f} ({w - b:+.0f}) | {b:.0f} |")
    table = "\n".join(lines) + "\n\n" + ab
    print(table)
    write_result(
        "profile_step",
        "python benchmarks/profile_step.py",
        table,
        f" (jax {jax.__version__}, {os.cpu_count()} cores, CPU; op time summed "
        f"over both cores' threads, medians of {CALLS} profiled calls)",
    )


if __name__ == "__main__":
    main()
