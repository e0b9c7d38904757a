"""The ``jlora`` command: ``jlora memory --params 7e9`` (more subcommands to come)."""

from __future__ import annotations

import argparse
import json
import sys

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
    args = parser.parse_args(argv)
    print(_memory(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
