"""The ``jlora`` command's front: parses the command line without importing JAX.

``jlora --help`` and a mistyped command answer at once; JAX and jlora are imported
only once a command runs (:mod:`jlora._src.cli` holds the commands). A ``LoraError``, a
bad argument or a missing file prints one line (``jlora: error: ...``) and exits
with status 1; set ``JLORA_TRACEBACK=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

#: What ``jlora memory`` prints by default: the source article's four attention targets.
MEMORY_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

DESCRIPTION = """LoRA adapters on the command line: estimate memory, inspect, merge, convert.

Base checkpoints are .npz files keyed by jax.tree_util.keystr of a nested-dict params tree
(what the main example caches), or, for convert, a torch model's model.safetensors (a file
or its directory); adapters are jlora adapter directories (save_adapter) or PEFT ones."""

CONVERT = """Turns a jlora adapter directory into a PEFT one, or a PEFT one into jlora's.

jlora -> PEFT: each adapted path becomes a torch module name, by default
params/layers/self_attn/q_proj/kernel at layer 3 -> layers.3.self_attn.q_proj. A model
whose torch names differ (Hugging Face's LlamaForCausalLM: model.layers.3...) needs
--prefix base_model.model.model. or a --module-fn. With --base MODEL.safetensors every
module written must exist in the torch model: refused otherwise, with the likely prefix.

PEFT -> jlora: --base gives the shapes (a jlora .npz, or the torch model's safetensors,
read in torch's layout); --module-fn and --prefix map the paths as above."""


def parser() -> argparse.ArgumentParser:
    """The command line, every subcommand and option (nothing heavy is imported)."""
    p = argparse.ArgumentParser(
        prog="jlora", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    mem = sub.add_parser(
        "memory",
        help="estimate training memory per method",
        description="Training memory per method: weights, gradients, "
        "optimizer states and activations (jlora._src.memory.estimate).",
    )
    src = mem.add_mutually_exclusive_group()
    src.add_argument(
        "--params",
        type=float,
        default=7e9,
        help="parameter count; Llama proportions are assumed (default 7e9)",
    )
    src.add_argument("--config", help="a Hugging Face config.json (or the example model's)")
    mem.add_argument("--batch", type=int, default=1)
    mem.add_argument("--seq", type=int, default=512)
    mem.add_argument("--rank", type=int, default=16)
    mem.add_argument("--targets", nargs="+", default=list(MEMORY_TARGETS))
    mem.add_argument("--checkpointing", action="store_true")
    mem.add_argument(
        "--article",
        action="store_true",
        help="the source article's 7B table, with the settings that reproduce it",
    )
    ins = sub.add_parser("inspect", help="targets, ranks, parameters and size of an adapter")
    ins.add_argument("adapter")
    ins.add_argument("--base", help="base .npz (needed for PEFT adapters)")
    mrg = sub.add_parser("merge", help="fold an adapter into a base .npz")
    for name in ("base", "adapter", "out"):
        mrg.add_argument(name)
    cnv = sub.add_parser(
        "convert",
        help="PEFT <-> jlora adapter directories",
        description=CONVERT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cnv.add_argument("src")
    cnv.add_argument("dst")
    cnv.add_argument(
        "--base",
        help="a base .npz, or the torch model's model.safetensors "
        "(file or directory): shapes for a PEFT source; the modules a PEFT "
        "destination must name",
    )
    cnv.add_argument(
        "--module-fn",
        metavar="MODULE:FUNCTION",
        help="(jlora_path, stack_index) -> torch module name, as an import "
        "spec: package.module:function or path/to/file.py:function",
    )
    cnv.add_argument(
        "--prefix", help="put before each module name in the PEFT keys (default base_model.model.)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs ``jlora ARGS``; returns the exit status (0, or 1 after a one-line error)."""
    args = parser().parse_args(argv)
    from jlora._src import cli  # JAX loads here, once a command runs

    try:
        print(cli.COMMANDS[args.command](args))
    except cli.EXPECTED as e:
        if os.environ.get("JLORA_TRACEBACK"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"jlora: error: {message}", file=sys.stderr)
        return 1
    return 0
