"""The ``jlora`` command's subcommands: ``memory``, ``inspect``, ``merge`` and ``convert``.

:mod:`jlora_cli` parses the command line (without importing JAX) and calls these.
Base checkpoints are ``.npz`` files keyed by ``jax.tree_util.keystr`` of a
nested-dict params tree (what the main example caches, e.g.
``"['params']['layers']['self_attn']['q_proj']['kernel']"``), or, for ``convert``, a
torch model's ``model.safetensors``; adapters are jlora adapter directories
(``save_adapter``) or PEFT adapter directories.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from jlora._src import memory
from jlora._src.adapter import Adapter, FullNode, LayersNode, LoraNode, TokenNode
from jlora._src.config import LoraError
from jlora._src.targets import Params

#: The errors a command reports in one line: a user's mistake, a missing file.
EXPECTED = (ValueError, TypeError, OSError)


def _memory(args: argparse.Namespace) -> str:
    if args.config:
        with open(args.config) as f:
            shape = memory.Shape.from_config(json.load(f))
    else:
        shape = memory.Shape.from_params(args.params)
    what = f"{shape.params / 1e9:.2f}B parameters ({shape})"
    rows: list[tuple[str, str, dict]]
    if args.article:
        rows = [
            (f"{m} (article: ~{ref} GB{', checkpointed' if kw['checkpointing'] else ''})", m, kw)
            for m, (ref, kw) in memory.ARTICLE.items()
        ]
        return (
            f"{what}, batch {memory.ARTICLE_TOKENS['batch']} x seq "
            f"{memory.ARTICLE_TOKENS['seq']}, r16 q,k,v,o:\n\n"
            + memory.table(shape, rows, **memory.ARTICLE_TOKENS)
        )
    rows = [(m, m, {}) for m in memory.METHODS]
    rows += [(f"qlora {q}", "qlora", {"qtype": q}) for q in memory.QTYPES if q != "nf4"]
    settings = dict(
        rank=args.rank,
        targets=tuple(args.targets),
        batch=args.batch,
        seq=args.seq,
        checkpointing=args.checkpointing,
    )
    return (
        f"{what}, batch {args.batch} x seq {args.seq}, r{args.rank} on "
        f"{','.join(args.targets)}, checkpointing {'on' if args.checkpointing else 'off'}:"
        "\n\n" + memory.table(shape, rows, **settings)
    )


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
    from jlora._src.peft.keys import CONFIG

    return os.path.isfile(os.path.join(path, CONFIG))


def _load_adapter(path: str, params: Params = None) -> Adapter:
    import jlora

    if _is_peft(path):
        if params is None:
            raise LoraError(
                f"{path} is a PEFT adapter: pass --base BASE.npz (or the torch "
                "model's model.safetensors) for its shapes"
            )
        return jlora.peft.load(path, params)
    return jlora.load_adapter(path, params)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _inspect(args: argparse.Namespace) -> str:
    import jax

    from jlora._src.adapter import adapter_nodes

    params = load_base(args.base) if args.base else None
    nodes = adapter_nodes(_load_adapter(args.adapter, params))
    lines = [
        f"{args.adapter}: {'PEFT' if _is_peft(args.adapter) else 'jlora'} adapter, "
        f"{len(nodes)} adapted leaves",
        "",
        "| path | shape | rank | alpha | scale | variant | parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    total = 0
    for p, n in nodes.items():
        count = sum(int(np.size(x)) for x in jax.tree.leaves(n))
        total += count
        lines.append(f"| {p} | {tuple(n.shape)} | {_row(n)} | {count:,} |")
    lines += ["", f"{total:,} parameters; {_dir_bytes(args.adapter) / 1e3:.1f} KB on disk"]
    return "\n".join(lines)


def _row(n: LoraNode | LayersNode | FullNode | TokenNode) -> str:
    """rank | alpha | scale | variant, for each kind a saved adapter holds (not a stack)."""

    if isinstance(n, FullNode):
        return "- | - | - | trained in full (modules_to_save)"
    if isinstance(n, TokenNode):
        ids = ", ".join(map(str, n.indices[:8])) + (", ..." if len(n.indices) > 8 else "")
        return f"- | - | - | token rows {ids} (trainable_token_indices)"
    variant = "dora" if n.magnitude is not None else "lora"
    if isinstance(n, LayersNode):
        variant += f" on layers {', '.join(map(str, n.layers))} of {n.length} (layers_to_transform)"
    return f"{n.rank} | {n.alpha:g} | {n.scale:.4g} | {variant}"


def _merge(args: argparse.Namespace) -> str:
    import jax

    import jlora

    params = load_base(args.base)
    merged = jlora.merge(params, _load_adapter(args.adapter, params))
    flat = jax.tree_util.tree_flatten_with_path(merged)[0]
    arrays: dict = {jax.tree_util.keystr(kp): np.asarray(v) for kp, v in flat}
    np.savez(args.out, **arrays)
    return f"merged {args.adapter} into {args.base}: wrote {args.out}"


def _convert(args: argparse.Namespace) -> str:
    import jlora

    kw: dict[str, Any] = {"module_fn": import_spec(args.module_fn)} if args.module_fn else {}
    if args.prefix is not None:
        kw["prefix"] = args.prefix
    torch_files = torch_base_files(args.base) if args.base else None
    npz = load_base(args.base) if args.base and not torch_files else None
    if _is_peft(args.src):
        params: Params = npz
        if torch_files:  # read in torch's layout: each Linear weight is (out, in)
            params = torch_tree(torch_files)
            kw["axes"] = torch_linear_axes(params)
        jlora.save_adapter(args.dst, _peft_adapter(args.src, params, kw))
        return f"{args.src} (PEFT) -> {args.dst} (jlora)"
    adapter = _load_adapter(args.src, npz)
    modules = _save_peft(args.dst, adapter, kw, torch_files)
    shown = ", ".join(modules[:4]) + (", ..." if len(modules) > 4 else "")
    return f"{args.src} (jlora) -> {args.dst} (PEFT): {len(modules)} modules, {shown}"


def _peft_adapter(path: str, params: Params, kw: dict) -> Adapter:
    import jlora

    if params is None:
        raise LoraError(
            f"{path} is a PEFT adapter: pass --base BASE.npz (or the torch "
            "model's model.safetensors) for its shapes"
        )
    return jlora.peft.load(path, params, **kw)


def _save_peft(dst: str, adapter: Adapter, kw: dict, torch_files: list[str] | None) -> list[str]:
    """Writes ``adapter`` to ``dst`` as PEFT, after checking its modules against the base.

    Returns:
      The torch module names written, sorted.
    """
    import jlora
    from jlora._src.io import atomic

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        jlora.peft.save(out, adapter, **kw)
        files = {}
        for name in os.listdir(out):
            with open(os.path.join(out, name), "rb") as f:
                files[name] = f.read()
        modules = written_modules(os.path.join(out, jlora.peft.WEIGHTS))
    if torch_files:
        check_modules(modules, torch_keys(torch_files))
    atomic.write_dir(dst, files)  # a previous dst stays until this succeeds
    return modules


#: Key segments that end a torch module's name in a PEFT file.
_PEFT_LEAVES = re.compile(r"^(lora_\w+|modules_to_save|trainable_tokens_\w+)$")
_PEFT_ROOT = "base_model.model."


def written_modules(weights: str) -> list[str]:
    """The torch module names an ``adapter_model.safetensors`` holds, sorted."""
    import safetensors

    with safetensors.safe_open(weights, "numpy") as f:
        keys = list(f.keys())
    modules = set()
    for key in keys:
        parts = key.removeprefix(_PEFT_ROOT).split(".")
        cut = next((i for i, s in enumerate(parts) if _PEFT_LEAVES.match(s)), len(parts) - 1)
        modules.add(".".join(parts[:cut]))
    return sorted(modules)


def check_modules(modules: list[str], base_keys: list[str]) -> None:
    """Refuses module names that the torch model does not have, naming the likely prefix."""
    have = {".".join(k.split(".")[:i]) for k in base_keys for i in range(1, k.count(".") + 2)}
    missing = [m for m in modules if m not in have]
    if not missing:
        return
    hint = "pass --prefix or --module-fn so that the names match the torch model's"
    like = sorted(h for h in have if h.endswith("." + missing[0]))
    if like:
        lead = like[0][: -len(missing[0])]
        hint = f"the base has {like[0]!r}: pass --prefix {_PEFT_ROOT}{lead} (or a --module-fn)"
    raise LoraError(
        f"{len(missing)} of the {len(modules)} modules written are not in the "
        f"torch base, e.g. {missing[:3]}; PEFT would load the file as the base "
        f"model without them; {hint}"
    )


def torch_base_files(path: str) -> list[str] | None:
    """The safetensors files of a torch model (file or directory); None for a jlora ``.npz``."""
    if path.endswith(".npz"):
        return None
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise LoraError(f"--base {path}: no .npz, .safetensors file or model.safetensors in it")
    return [os.path.join(path, n) for n in files]


def torch_keys(files: list[str]) -> list[str]:
    import safetensors

    keys: list[str] = []
    for name in files:
        with safetensors.safe_open(name, "numpy") as f:
            keys += list(f.keys())
    return keys


def torch_tree(files: list[str]) -> dict:
    """A torch state dict as a nested dict by its dotted names (torch's layout kept)."""
    import safetensors

    tree: dict = {}
    for name in files:
        with safetensors.safe_open(name, "flax") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors file: not iterable)
                *parents, leaf = key.split(".")
                node = tree
                for k in parents:
                    node = node.setdefault(k, {})
                node[leaf] = f.get_tensor(key)
    return tree


def torch_linear_axes(params: dict) -> dict:
    """``peft.load``'s ``axes`` for a torch tree: each ``nn.Linear`` weight is ``(out, in)``."""
    from jlora._src.targets import flatten, path_str

    return {
        path_str(kp): ((), (1,), (0,))
        for kp, leaf in flatten(params)[0]
        if path_str(kp).endswith("/weight")
        and np.ndim(leaf) == 2
        and not re.search("embed", path_str(kp))
    }


def import_spec(spec: str) -> Callable:
    """The function an import spec names: ``package.module:function`` or ``file.py:function``.

    The current directory is importable, as with ``python -m``; a file's own directory
    too, so that it can import its neighbours.
    """
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr:
        raise ValueError(
            f"--module-fn {spec!r}: expected MODULE:FUNCTION, e.g. "
            "llama:hf_module or examples/llama.py:hf_module"
        )
    if module.endswith(".py"):
        folder = os.path.dirname(os.path.abspath(module))
        sys.path.insert(0, folder)
        found = importlib.util.spec_from_file_location(os.path.basename(module)[:-3], module)
        if found is None or found.loader is None or not os.path.isfile(module):
            raise ValueError(f"--module-fn {spec!r}: no file {module}")
        mod = importlib.util.module_from_spec(found)
        found.loader.exec_module(mod)
    else:
        sys.path.insert(0, os.getcwd())
        mod = importlib.import_module(module)
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ValueError(f"--module-fn {spec!r}: {module} has no function {attr!r}")
    return fn


COMMANDS = {"memory": _memory, "inspect": _inspect, "merge": _merge, "convert": _convert}


def main(argv: list[str] | None = None) -> int:
    """``jlora ARGS`` (the console script is :func:`jlora_cli.main`, which this calls)."""
    from jlora_cli import main as run

    return run(argv)
