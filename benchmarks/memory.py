"""XLA's ``memory_analysis()`` of one training step vs ``jlora._src.memory``'s estimate.

Steps (AdamW, adapter and optimizer state donated): full fine-tuning in fp32,
LoRA on a bf16 base, QLoRA on a base in each registered format (NF4, int8, int4,
fp8, mxfp4, nvfp4, mxfp8, fp8_block; bf16 compute); LoRA r16
on q,k,v,o. Then gpt-oss-20b (a mixture of experts): the estimate per format, its base
bytes checked against ``jlora.quantize`` of an abstract tree of that shape. Then the bytes
each of 8 virtual devices stores of a sharded quantized kernel.
Everything is abstract (``jax.eval_shape``), so even 7B shapes compile here
without allocating. Run from the repo root: ``python benchmarks/memory.py``
(writes ``benchmarks/results/memory.md``).
"""

import argparse
import dataclasses
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import llama  # noqa: E402

import jlora  # noqa: E402
from jlora._src import memory  # noqa: E402

#: Every registered format, smallest first (nf4, int4, mxfp4, nvfp4, fp8, int8, ...).
QTYPES = memory.QTYPES

MB = 2**20
LORA = jlora.LoraConfig(rank=16, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
SIZES = {
    "tiny": llama.LlamaConfig.named("tiny"),
    "bench": llama.LlamaConfig.named("bench"),
    "llama-7b": llama.LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        max_seq_len=512,
    ),
}


def _analysis(step, *args, donate=(1, 2)):
    m = jax.jit(step, donate_argnums=donate).lower(*args).compile().memory_analysis()
    return m.argument_size_in_bytes, m.temp_size_in_bytes


def _base_bytes(params) -> int:
    return sum(math.prod(l.shape) * l.dtype.itemsize for l in jax.tree.leaves(params))


def measure(cfg: llama.LlamaConfig, batch: int, seq: int, qtypes=QTYPES) -> dict:
    """``{method: (base argument bytes, all argument bytes, temp bytes)}``, QLoRA on each of
    ``qtypes``."""
    key = jax.random.key(0)
    ids = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    tx = optax.adamw(1e-4)
    out = {}
    methods = [("full-fp32", jnp.float32), ("lora", jnp.bfloat16)]
    methods += [("qlora" if q == "nf4" else f"qlora-{q}", jnp.bfloat16) for q in qtypes]
    for method, dtype in methods:
        model = llama.Llama(dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype))
        params = jax.eval_shape(lambda: llama.init_params(model.config, key))
        loss = lambda p, ad, x: llama.loss_fn(
            (
                model.apply(p, x[:, :-1])
                if ad is None
                else jlora.apply(model.apply)(p, ad, x[:, :-1])
            ).astype(jnp.float32),
            x[:, 1:],
        )
        if method == "full-fp32":

            def step(x, p, opt):
                g = jax.grad(lambda q: loss(q, None, x))(p)
                u, opt = tx.update(g, opt, p)
                return optax.apply_updates(p, u), opt

            opt = jax.eval_shape(tx.init, params)
            out[method] = (_base_bytes(params),) + _analysis(step, ids, params, opt)
            continue
        if method.startswith("qlora"):
            qtype = method.partition("-")[2] or "nf4"
            group = math.gcd(128, cfg.hidden_size, cfg.intermediate_size)  # 128 at 7B
            params = jax.eval_shape(
                lambda p: jlora.quantize(
                    p, qtype=qtype, group_size=group if qtype == "int4" else None
                ),
                params,
            )
        lora_cfg = dataclasses.replace(LORA, dtype=jnp.float32)
        ad = jax.eval_shape(lambda p: jlora.init(key, p, lora_cfg), params)
        opt = jax.eval_shape(tx.init, ad)

        def step(x, ad, opt, p):
            g = jax.grad(lambda a: loss(p, a, x))(ad)
            u, opt = tx.update(g, opt, ad)
            return optax.apply_updates(ad, u), opt

        out[method] = (_base_bytes(params),) + _analysis(step, ids, ad, opt, params)
        if method == "lora":  # context: the bf16 base's forward alone, no adapter
            fwd = lambda x, p: model.apply(p, x[:, :-1])
            out["bf16 forward only"] = (_base_bytes(params),) + _analysis(
                fwd, ids, params, donate=()
            )
    return out


#: gpt-oss-20b's config.json (its sizes; transformers' GptOssConfig defaults are 120b's).
GPT_OSS_20B = memory.Shape(
    hidden=2880,
    intermediate=2880,
    layers=24,
    heads=64,
    vocab=201088,
    kv_heads=8,
    head_dim=64,
    experts=32,
    experts_per_tok=4,
)


def moe_rows(shape: memory.Shape, batch: int, seq: int, qtypes=QTYPES) -> str:
    """A mixture of experts at full size: the estimate per method and format, and its base
    bytes against those of ``jlora.quantize`` of an abstract tree of that shape (attention
    ``(in, out)``, each MLP's experts stacked ``(experts, in, out)``, bf16; embeddings, head
    and router stay bf16). No XLA step: the repository's only MoE model is the test port,
    and XLA's CPU lowers ``ragged_dot`` densely across experts, which no accelerator does."""
    bf16 = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.bfloat16)
    layer = {
        name: bf16(*((shape.copies(name),) if shape.copies(name) > 1 else ()), a, b)
        for name, (a, b) in shape.linear_shapes().items()
    }
    layer["router"] = bf16(shape.hidden, shape.experts)
    tree = {
        "embed": bf16(shape.vocab, shape.hidden),
        "lm_head": bf16(shape.vocab, shape.hidden),
        "layers": [layer] * shape.layers,
    }
    size = lambda t: sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(t))
    lines = [
        "| method | base MB (quantize) | base MB (estimate) | total MB (estimate) |",
        "|---|---|---|---|",
    ]
    rows = [(m, m, None) for m in memory.METHODS[:3]] + [
        ("qlora" if q == "nf4" else f"qlora-{q}", "qlora", q) for q in qtypes
    ]
    for label, method, qtype in rows:
        base, group = tree, None
        if qtype is not None:
            targets = memory.LINEAR
            group = math.gcd(128, shape.hidden, shape.intermediate) if qtype == "int4" else None
            base = jax.eval_shape(
                lambda t, q=qtype, g=group: jlora.quantize(
                    t, qtype=q, targets=targets, group_size=g
                ),
                tree,
            )
        est = memory.estimate(shape, method, batch=batch, seq=seq, qtype=qtype or "nf4")
        trained = method in ("lora", "qlora")
        adapter = 4 * shape.lora_params(16, memory.LINEAR[:4]) if trained else 0
        scale = 2 if method == "full-fp32" else 1  # (fp32 weights: twice the bf16 tree)
        if group is not None and qtype == "int4":
            label += f" (group {group}: the estimate assumes 128, which does not divide it)"
        lines.append(
            f"| {label} | {scale * size(base) / MB:.0f} | {(est['weights'] - adapter) / MB:.0f} "
            f"| {est['total'] / MB:.0f} |"
        )
    return "\n".join(lines)


def per_device(qtypes=QTYPES) -> str:
    """Bytes each device stores of a quantized 7B MLP kernel split 4 ways along its out
    axis, on 8 virtual CPU devices (a child process: the device count is fixed at start)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import memory; "
    code += f"print(memory._per_device({list(qtypes)!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def _per_device(qtypes=QTYPES) -> str:
    from jax.sharding import NamedSharding, PartitionSpec

    m = jax.make_mesh((2, 4), ("data", "model"))
    w = jax.device_put(
        jax.random.normal(jax.random.key(0), (4096, 11008), jnp.bfloat16),
        NamedSharding(m, PartitionSpec(None, "model")),
    )
    lines = [
        "Per device: a 7B `up_proj` kernel (4096 x 11008, bf16) split 4 ways along its "
        "out axis on a 2 x 4 mesh of 8 virtual CPU devices (`jlora.quantize` of the "
        "sharded array; bytes of each device's shards of the codes and scales)",
        "",
        "| qtype | bytes / param | whole MB | largest per device MB | per device / whole |",
        "|---|---|---|---|---|",
        f"| bf16 (no quantization) | 2.000 | {w.nbytes / MB:.1f} "
        f"| {w.addressable_shards[0].data.nbytes / MB:.1f} | 0.250 |",
    ]
    for qtype in qtypes:
        node = jlora.quantize({"w": w}, qtype=qtype)["w"]
        dev: dict = {}
        for a in jax.tree.leaves(node):
            for s in a.addressable_shards:
                dev[s.device] = dev.get(s.device, 0) + s.data.nbytes
        big = max(dev.values())
        lines.append(
            f"| {qtype} | {node.nbytes / node.size:.3f} | {node.nbytes / MB:.1f} | "
            f"{big / MB:.1f} | {big / node.nbytes:.3f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["bench", "llama-7b"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument(
        "--qtypes", nargs="+", choices=QTYPES, default=QTYPES, help="QLoRA rows' base formats"
    )
    parser.add_argument(
        "--remat",
        choices=("off", "also", "only"),
        default="off",
        help="rows with activation checkpointing (remat per layer)",
    )
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "memory.md")
    )
    args = parser.parse_args()
    backend = jax.devices()[0]
    lines = [
        f"`python benchmarks/memory.py` (jax {jax.__version__}, XLA "
        f"{backend.platform.upper()} ({backend.device_kind}) "
        f"`memory_analysis()`; batch {args.batch} x seq {args.seq}, AdamW, LoRA r16 on "
        "q,k,v,o; estimate: `jlora._src.memory.estimate`, checkpointing as the row says)",
        "",
        "| model | method | base MB | base / bf16 | arguments MB | temp MB | XLA total MB "
        "| estimate MB | estimate / XLA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sizes = [(n, False) for n in args.sizes if args.remat != "only"] + [
        (n, True) for n in args.sizes if args.remat != "off"
    ]
    for name, remat in sizes:
        cfg = dataclasses.replace(SIZES[name], remat=remat)
        res = measure(cfg, args.batch, args.seq, args.qtypes)
        name = name + (" (remat)" if remat else "")
        shape = memory.Shape.from_config(vars(cfg))
        for method, (base, arg, temp) in res.items():
            ratio = base / res["lora"][0]
            row = (
                f"| {name} | {method} | {base / MB:.1f} | {ratio:.3f} | {arg / MB:.1f} "
                f"| {temp / MB:.1f} | {(arg + temp) / MB:.1f} |"
            )
            kind, _, qtype = method.partition("-")
            if kind in memory.METHODS or method in memory.METHODS:
                est = memory.estimate(
                    shape,
                    method if method in memory.METHODS else kind,
                    batch=args.batch,
                    seq=args.seq,
                    checkpointing=remat,
                    qtype=qtype if kind == "qlora" and qtype else "nf4",
                )["total"]
                row += f" {est / MB:.1f} | {est / (arg + temp):.2f} |"
            else:
                row += " | |"
            lines.append(row)
        print("\n".join(lines[-len(res) :]), flush=True)
    lines += [
        "",
        f"gpt-oss-20b ({GPT_OSS_20B.params / 1e9:.2f}B parameters, 32 experts, top-4; "
        f"batch {args.batch} x seq {args.seq}, LoRA r16 on q,k,v,o): `moe_rows`",
        "",
        moe_rows(GPT_OSS_20B, args.batch, args.seq, args.qtypes),
        "",
        per_device(args.qtypes),
    ]
    table = "\n".join(lines)
    print(table)
    with open(args.out, "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
