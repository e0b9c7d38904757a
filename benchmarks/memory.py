"""XLA's ``memory_analysis()`` of one training step vs ``jlora.memory``'s estimate.

Steps (AdamW, adapter and optimizer state donated): full fine-tuning in fp32,
LoRA on a bf16 base, QLoRA on an NF4 base (bf16 compute); LoRA r16 on q,k,v,o.
Everything is abstract (``jax.eval_shape``), so even 7B shapes compile here
without allocating. Run from the repo root: ``python benchmarks/memory.py``
(writes ``benchmarks/results/memory.md``).
"""

import argparse
import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import llama  # noqa: E402

import jlora  # noqa: E402
from jlora import memory  # noqa: E402

MB = 2 ** 20
LORA = jlora.LoraConfig(rank=16, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
SIZES = {"tiny": llama.LlamaConfig.named("tiny"), "bench": llama.LlamaConfig.named("bench"),
         "llama-7b": llama.LlamaConfig(vocab_size=32000, hidden_size=4096,
                                       intermediate_size=11008, num_layers=32, num_heads=32,
                                       max_seq_len=512)}


def _analysis(step, *args, donate=(1, 2)):
    m = jax.jit(step, donate_argnums=donate).lower(*args).compile().memory_analysis()
    return m.argument_size_in_bytes, m.temp_size_in_bytes


def _base_bytes(params) -> int:
    return sum(math.prod(l.shape) * l.dtype.itemsize for l in jax.tree.leaves(params))


def measure(cfg: llama.LlamaConfig, batch: int, seq: int) -> dict:
    """``{method: (base argument bytes, all argument bytes, temp bytes)}``."""
    key = jax.random.key(0)
    ids = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    tx = optax.adamw(1e-4)
    out = {}
    for method, dtype in (("full-fp32", jnp.float32), ("lora", jnp.bfloat16),
                          ("qlora", jnp.bfloat16)):
        model = llama.Llama(dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype))
        params = jax.eval_shape(lambda: llama.init_params(model.config, key))
        loss = lambda p, ad, x: llama.loss_fn(
            (model.apply(p, x[:, :-1]) if ad is None else
             jlora.apply(model.apply)(p, ad, x[:, :-1])).astype(jnp.float32), x[:, 1:])
        if method == "full-fp32":
            def step(x, p, opt):
                g = jax.grad(lambda q: loss(q, None, x))(p)
                u, opt = tx.update(g, opt, p)
                return optax.apply_updates(p, u), opt
            opt = jax.eval_shape(tx.init, params)
            out[method] = (_base_bytes(params),) + _analysis(step, ids, params, opt)
            continue
        if method == "qlora":
            params = jax.eval_shape(jlora.quantize, params)
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
            out["bf16 forward only"] = (_base_bytes(params),) + _analysis(fwd, ids, params,
                                                                           donate=())
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["bench", "llama-7b"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--remat", choices=("off", "also", "only"), default="off",
                        help="rows with activation checkpointing (remat per layer)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "memory.md"))
    args = parser.parse_args()
    backend = jax.devices()[0]
    lines = [f"`python benchmarks/memory.py` (jax {jax.__version__}, XLA "
             f"{backend.platform.upper()} ({backend.device_kind}) "
             f"`memory_analysis()`; batch {args.batch} x seq {args.seq}, AdamW, LoRA r16 on "
             "q,k,v,o; estimate: `jlora.memory.estimate`, checkpointing as the row says)", "",
             "| model | method | base MB | base / bf16 | arguments MB | temp MB | XLA total MB "
             "| estimate MB | estimate / XLA |", "|---|---|---|---|---|---|---|---|---|"]
    sizes = [(n, False) for n in args.sizes if args.remat != "only"] + [
        (n, True) for n in args.sizes if args.remat != "off"]
    for name, remat in sizes:
        cfg = dataclasses.replace(SIZES[name], remat=remat)
        res = measure(cfg, args.batch, args.seq)
        name = name + (" (remat)" if remat else "")
        shape = memory.Shape.from_config(vars(cfg))
        for method, (base, arg, temp) in res.items():
            ratio = base / res["lora"][0]
            row = (f"| {name} | {method} | {base / MB:.1f} | {ratio:.3f} | {arg / MB:.1f} "
                   f"| {temp / MB:.1f} | {(arg + temp) / MB:.1f} |")
            if method in memory.METHODS:
                est = memory.estimate(shape, method, batch=args.batch, seq=args.seq,
                                      checkpointing=remat)["total"]
                row += f" {est / MB:.1f} | {est / (arg + temp):.2f} |"
            lines.append(row + (" | |" if method not in memory.METHODS else ""))
        print("\n".join(lines[-len(res):]), flush=True)
    table = "\n".join(lines)
    print(table)
    with open(args.out, "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
