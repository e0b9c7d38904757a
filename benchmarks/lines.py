"""Where jlora's lines go, per commit: the accounting issue 42 asks for ("report jlora/'s
lines before and after").

Each commit's ``jlora/`` and ``jlora_cli/`` are taken from git (``git archive``), formatted
with this checkout's ruff settings (so a packed file and a formatted one count alike), and
counted five ways:

- ``total``: every line, as ``wc -l`` would count the formatted files;
- ``blank``, ``comment`` (lines that are only a comment) and ``docstring`` lines;
- ``defs``: the functions, lambdas and classes (each ``def``/``class`` is a logic line);
- ``signature``: the lines a ``def`` spans beyond its first (one parameter a line once the
  annotated signature passes the line length);
- ``logic``: the non-blank lines left when docstrings, comments and annotations are removed
  (``ast.unparse``) and the result is formatted again: what the code does, whatever its
  annotations and documentation.

Usage::

    python benchmarks/lines.py                    # the filing of issue 42, its end, HEAD
    python benchmarks/lines.py 2e0199e HEAD       # any commits

Needs git and ruff (the ``test`` extra). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("jlora", "jlora_cli")
#: Issue 42's filing commit and the commit that ended its reshape (before issue 43's formats).
DEFAULT_REVS = ("2e0199e", "aeef458", "HEAD")


def _docstring(node: ast.AST) -> ast.Expr | None:
    if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        return body[0] if isinstance(body[0].value.value, str) else None
    return None


class _Strip(ast.NodeTransformer):
    """Docstrings and annotations out; a bare annotated field becomes ``name = None``."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        if _docstring(node) is not None:
            node.body = node.body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.returns = None
            args = node.args
            for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
                if a is not None:
                    a.annotation = None
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.Assign:
        value = node.value if node.value is not None else ast.Constant(None)
        return ast.Assign(targets=[node.target], value=value, lineno=node.lineno)


def _count(tree: pathlib.Path) -> dict[str, int]:
    counts = dict.fromkeys(("total", "blank", "comment", "docstring", "signature", "defs"), 0)
    for path in sorted(tree.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        counts["total"] += len(lines)
        counts["blank"] += sum(not line.strip() for line in lines)
        counts["comment"] += sum(line.strip().startswith("#") for line in lines)
        for node in ast.walk(ast.parse(text)):
            doc = _docstring(node)
            if doc is not None:
                counts["docstring"] += doc.end_lineno - doc.lineno + 1  # type: ignore[operator]
            counts["defs"] += isinstance(node, ast.ClassDef | ast.FunctionDef | ast.Lambda)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                counts["signature"] += node.body[0].lineno - node.lineno - 1
    return counts


def _logic(tree: pathlib.Path, out: pathlib.Path) -> int:
    for path in tree.rglob("*.py"):
        stripped = ast.fix_missing_locations(_Strip().visit(ast.parse(path.read_text())))
        target = out / path.relative_to(tree)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(ast.unparse(stripped) + "\n")
    _format(out)
    return sum(
        sum(bool(line.strip()) for line in p.read_text().splitlines()) for p in out.rglob("*.py")
    )


def _format(tree: pathlib.Path) -> None:
    config = ROOT / "pyproject.toml"
    cmd = [sys.executable, "-m", "ruff", "format", "-q", "--config", str(config), str(tree)]
    subprocess.run(cmd, check=True)


def measure(rev: str) -> dict[str, int]:
    """The counts of ``rev``'s packages, formatted alike."""
    with tempfile.TemporaryDirectory() as tmp:
        src, logic = pathlib.Path(tmp, "src"), pathlib.Path(tmp, "logic")
        src.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, *PACKAGES], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        _format(src)
        counts = _count(src)
        counts["logic"] = _logic(src, logic)
        counts["modules"] = len(list(src.rglob("*.py")))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revs", nargs="*", default=DEFAULT_REVS, help="git commits")
    args = parser.parse_args()
    cols = ("modules", "defs", "total", "blank", "comment", "docstring", "signature", "logic")
    print("| commit | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for rev in args.revs:
        short = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", rev],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        counts = measure(rev)
        print(f"| {rev} ({short}) | " + " | ".join(str(counts[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
