"""The ``jlora`` command: ``memory``, ``inspect``, ``merge`` and ``convert``.

Base checkpoints are ``.npz`` files keyed by ``jax.tree_util.keystr`` of a
nested-dict params tree (what the main example caches, e.g.
``"['params']['layers']['self_attn']['q_proj']['kernel']"``); adapters are
jlora adapter directories (``save_adapter``) or PEFT adapter directories.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

from jlora import memory


def _memory(args) -> str:
    if args.config:
        with open(args.config) as f:
            shape = memory.Shape.from_config(json.load(f))
    else:
        shape = memory.Shape.from_params(args.params)
    what = f"{shape.params / 1e9:.2f}B parameters ({shape})"
    if args.article:
        rows = [(f"{m} (article: ~{ref} GB{', checkpointed' if kw['checkpointing'] else ''})",
                 m, kw) for m, (ref, kw) in memory.ARTICLE.items()]
        return (f"{what}, batch {memory.ARTICLE_TOKENS['batch']} x seq "
                f"{memory.ARTICLE_TOKENS['seq']}, r16 q,k,v,o:\n\n"
                + memory.table(shape, rows, **memory.ARTICLE_TOKENS))
    rows = [(m, m, {}) for m in memory.METHODS]
    settings = dict(rank=args.rank, targets=tuple(args.targets), batch=args.batch,
                    seq=args.seq, checkpointing=args.checkpointing)
    return (f"{what}, batch {args.batch} x seq {args.seq}, r{args.rank} on "
            f"{','.join(args.targets)}, checkpointing {'on' if args.checkpointing else 'off'}:"
            "\n\n" + memory.table(shape, rows, **settings))


def load_base(path: str) -> dict:
    """A params tree from an ``.npz`` keyed by ``keystr`` paths."""
    tree: dict = {}
    with np.load(path) as f:
        for name in f.files:
            keys = re.findall(r"\['([^']*)'\]", name)
            if not keys:
                continue  # not a parameter (e.g. the example's cached loss curve)
            node = tree
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = f[name]
    return tree


def _is_peft(path: str) -> bool:
    from jlora.io.peft import CONFIG
    return os.path.isfile(os.path.join(path, CONFIG))


def _load_adapter(path: str, params=None):
    import jlora
    if _is_peft(path):
        if params is None:
            raise SystemExit(f"{path} is a PEFT adapter: pass --base BASE.npz for its shapes")
        return jlora.peft.load(path, params)
    return jlora.load_adapter(path, params)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _inspect(args) -> str:
    import jax

    from jlora.adapter import adapter_nodes
    params = load_base(args.base) if args.base else None
    nodes = adapter_nodes(_load_adapter(args.adapter, params))
    lines = [f"{args.adapter}: {'PEFT' if _is_peft(args.adapter) else 'jlora'} adapter, "
             f"{len(nodes)} adapted leaves", "",
             "| path | shape | rank | alpha | scale | variant | parameters |",
             "|---|---|---|---|---|---|---|"]
    total = 0
    for p, n in nodes.items():
        count = sum(int(np.size(x)) for x in jax.tree.leaves(n))
        total += count
        lines.append(f"| {p} | {tuple(n.shape)} | {_row(n)} | {count:,} |")
    lines += ["", f"{total:,} parameters; {_dir_bytes(args.adapter) / 1e3:.1f} KB on disk"]
    return "\n".join(lines)


def _row(n) -> str:
    """rank | alpha | scale | variant, for any node kind."""
    from jlora.adapter import FullNode, LayersNode, TokenNode
    if isinstance(n, FullNode):
        return "- | - | - | trained in full (modules_to_save)"
    if isinstance(n, TokenNode):
        ids = ", ".join(map(str, n.indices[:8])) + (", ..." if len(n.indices) > 8 else "")
        return f"- | - | - | token rows {ids} (trainable_token_indices)"
    variant = "dora" if n.magnitude is not None else "lora"
    if isinstance(n, LayersNode):
        variant += f" on layers {', '.join(map(str, n.layers))} of {n.length} (layers_to_transform)"
    return f"{n.rank} | {n.alpha:g} | {n.scale:.4g} | {variant}"


def _merge(args) -> str:
    import jax

    import jlora
    params = load_base(args.base)
    merged = jlora.merge(params, _load_adapter(args.adapter, params))
    flat = jax.tree_util.tree_flatten_with_path(merged)[0]
    arrays: dict = {jax.tree_util.keystr(kp): np.asarray(v) for kp, v in flat}
    np.savez(args.out, **arrays)
    return f"merged {args.adapter} into {args.base}: wrote {args.out}"


def _convert(args) -> str:
    import jlora
    params = load_base(args.base) if args.base else None
    adapter = _load_adapter(args.src, params)
    if _is_peft(args.src):
        jlora.save_adapter(args.dst, adapter)
        return f"{args.src} (PEFT) -> {args.dst} (jlora)"
    jlora.peft.save(args.dst, adapter)
    return f"{args.src} (jlora) -> {args.dst} (PEFT)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    mem = sub.add_parser("memory", help="estimate training memory per method",
                         description=memory.__doc__.split("\n\n")[0])
    src = mem.add_mutually_exclusive_group()
    src.add_argument("--params", type=float, default=7e9,
                     help="parameter count; Llama proportions are assumed (default 7e9)")
    src.add_argument("--config", help="a Hugging Face config.json (or the example model's)")
    mem.add_argument("--batch", type=int, default=1)
    mem.add_argument("--seq", type=int, default=512)
    mem.add_argument("--rank", type=int, default=16)
    mem.add_argument("--targets", nargs="+", default=list(memory.LINEAR[:4]))
    mem.add_argument("--checkpointing", action="store_true")
    mem.add_argument("--article", action="store_true",
                     help="the source article's 7B table, with the settings that reproduce it")
    ins = sub.add_parser("inspect", help="targets, ranks, parameters and size of an adapter")
    ins.add_argument("adapter")
    ins.add_argument("--base", help="base .npz (needed for PEFT adapters)")
    mrg = sub.add_parser("merge", help="fold an adapter into a base .npz")
    for name in ("base", "adapter", "out"):
        mrg.add_argument(name)
    cnv = sub.add_parser("convert", help="PEFT <-> jlora adapter directories")
    cnv.add_argument("src")
    cnv.add_argument("dst")
    cnv.add_argument("--base", help="base .npz (needed to read a PEFT adapter)")
    args = parser.parse_args(argv)
    run = {"memory": _memory, "inspect": _inspect, "merge": _merge, "convert": _convert}
    print(run[args.command](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
