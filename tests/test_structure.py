"""The package's shape: layered imports with no circles, rule tables keyed by primitives.

Parses every module under ``jlora/`` (no imports run), builds the graph of
imports between jlora modules (function-level imports included) and checks it
against the layers of docs/how-it-works.md ("Layers"), bottom to top.
"""

import ast
import inspect
import pathlib

import jax
import pytest

import jlora

ROOT = pathlib.Path(jlora.__file__).parent  # the package under test (source or installed wheel)
PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"

#: Bottom to top; a module may import its own layer or lower ones only.
LAYERS = [
    (
        "config and targets",
        (
            "jlora._src.config",
            "jlora._src.targets",
            "jlora._src.qnode",
            "jlora._src.nf4",
            "jlora._src.moved",
        ),
    ),
    ("adapter nodes", ("jlora._src.adapter",)),
    ("numerics", ("jlora._src.numerics",)),
    ("interpreter", ("jlora._src.interpret",)),
    ("transforms", ("jlora._src.transforms",)),
    (
        "training, I/O and serving",
        ("jlora._src.optim", "jlora._src.io", "jlora._src.peft", "jlora._src.serving"),
    ),
    ("tools", ("jlora._src.memory",)),
    ("the public modules and the command", ("jlora", "jlora._src.cli")),
]
#: The modules outside ``jlora._src``: the API, and the old paths kept with a warning.
PUBLIC = {"jlora", "jlora.peft", "jlora.memory"}
DEPRECATED = {"jlora.adapter", "jlora.config", "jlora.targets"}
#: What the bottom layer may import from JAX: pytrees and dtypes, nothing that traces.
BOTTOM_JAX = {"jax"}


def _module_name(path: pathlib.Path) -> str:
    parts = ("jlora",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import in ``name``, any depth of the file."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1]
                    + ([base] if base else [])
                )
            for a in node.names:  # `from pkg import mod` imports the module pkg.mod
                sub = f"{base}.{a.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {i for i, _ in _imports(m) if i in MODULES and i != m} for m in MODULES}


def _layer(name: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if name == p or name.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    assert best is not None, f"{name} is in no layer of LAYERS; add it to one"
    return best[0]


def _find_cycle(graph: dict[str, set[str]]):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
        for m, deps in graph.items()
        for d in deps
        if _layer(d) > _layer(m)
    )


def test_the_layer_check_sees_upward_imports():
    assert _upward(
        {"jlora._src.interpret.core": {"jlora._src.io.peft"}, "jlora._src.io.peft": set()}
    )
    assert _upward({"jlora._src.targets": {"jlora._src.numerics.quant"}})
    assert not _upward({"jlora._src.io.peft": {"jlora._src.interpret.core", "jlora._src.config"}})


def test_every_module_is_in_a_layer_and_imports_down():
    bad = _upward(_graph())
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


def test_the_implementation_is_private():
    outside = {m for m in MODULES if m != "jlora._src" and not m.startswith("jlora._src.")}
    assert outside == PUBLIC | DEPRECATED, "a module outside jlora._src is public API"
    graph = _graph()
    for m in DEPRECATED:  # two lines each: a forwarding __getattr__
        assert graph[m] == {"jlora._src.moved"}, m
    for m in PUBLIC - {"jlora"}:  # the public modules re-export, they hold no code
        assert all(d.startswith("jlora._src.") for d in graph[m]), m
        tree = ast.parse(MODULES[m].read_text())
        assert not any(isinstance(n, ast.FunctionDef | ast.ClassDef) for n in tree.body), m
    below = {m for m in MODULES if m.startswith("jlora._src.")} - {"jlora._src.cli"}
    for m in below:  # the implementation never reaches back up to the API
        assert not graph[m] & (PUBLIC | DEPRECATED), f"{m} imports {graph[m] & PUBLIC}"


def test_the_old_paths_still_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match="use jlora.path_str"):
        assert jlora.targets.path_str is jlora.path_str
    with pytest.warns(DeprecationWarning, match="use jlora.adapter_nodes"):
        from jlora.adapter import adapter_nodes
    assert adapter_nodes is jlora.adapter_nodes
    with pytest.warns(DeprecationWarning, match="private"):
        from jlora.config import ALL_LINEAR
    assert "q_proj" in ALL_LINEAR


def test_the_bottom_layer_does_not_trace():
    bottom = [m for m in MODULES if _layer(m) == 0]
    assert {"jlora._src.config", "jlora._src.targets"} <= set(bottom)
    for m in bottom:
        jax_imports = {i for i, _ in _imports(m) if i.split(".")[0] == "jax"}
        assert jax_imports <= BOTTOM_JAX, f"{m} imports {jax_imports - BOTTOM_JAX}"
        source = MODULES[m].read_text()
        for traced in ("jnp.", "lax.", "jax.jit", "make_jaxpr", "eval_shape"):
            assert traced not in source, f"{m} uses {traced}"


def test_imports_are_read_from_the_source():
    graph = _graph()
    assert "jlora.peft" in graph["jlora"]  # `from jlora import peft as peft`
    assert "jlora._src.interpret.probe" in graph["jlora._src.transforms.init"]


def test_rules_are_keyed_by_primitive_objects():
    from jlora._src.interpret import core

    prims = jax.extend.core.primitives
    assert core.RULES, "no rules registered"
    assert all(isinstance(p, jax.extend.core.Primitive) for p in core.RULES)
    for p in (
        jax.lax.dot_general_p,
        jax.lax.transpose_p,
        jax.lax.reshape_p,
        jax.lax.scan_p,
        jax.lax.cond_p,
        jax.lax.while_p,
        prims.jit_p,
        prims.custom_jvp_call_p,
        prims.custom_vjp_call_p,
    ):
        assert p in core.RULES, f"no rule for {p}"
    remat = getattr(prims, "remat_p", None)  # exported since JAX 0.8
    assert remat in core.RULES if remat is not None else "checkpoint" in core.RULES_BY_NAME
    # a name is only a fallback for primitives this JAX does not export as objects
    exported = {v.name for v in vars(prims).values() if isinstance(v, jax.extend.core.Primitive)}
    assert not set(core.RULES_BY_NAME) & exported


def test_one_rule_module_per_family():
    from jlora._src.interpret import core

    homes = {p.name: inspect.getmodule(r).__name__ for p, r in core.RULES.items()}
    assert homes["dot_general"] == "jlora._src.interpret.dot"
    assert homes["transpose"] == homes["reshape"] == "jlora._src.interpret.shape"
    assert homes["scan"] == homes["while"] == homes["jit"] == "jlora._src.interpret.control"


@pytest.mark.parametrize("name", ["apply", "explain", "init", "merge", "peft", "NF4"])
def test_public_names_stay(name):
    assert name in jlora.__all__ and hasattr(jlora, name)


def test_runtime_dependencies_are_exactly_what_the_library_imports():
    """pyproject's dependencies name every third-party package jlora/ imports, and no other
    (flax, the example model's, is in the test and examples extras)."""
    import re
    import sys

    import tomllib

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    dist_to_module = {"orbax-checkpoint": "orbax"}
    declared = {
        dist_to_module.get(n, n)
        for n in (re.match(r"[A-Za-z0-9_.-]+", d).group(0) for d in project["dependencies"])
    }
    imported = {m.split(".")[0] for name in MODULES for m, _ in _imports(name)}
    third_party = imported - set(sys.stdlib_module_names) - {"jlora", "jlora_cli", "__future__"}
    assert third_party == declared


def test_the_package_says_it_is_typed_and_its_version():
    """``py.typed`` ships with the package, and ``__version__`` is pyproject's version."""
    import tomllib

    project = tomllib.loads(PYPROJECT.read_text())
    assert (ROOT / "py.typed").exists()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["jlora"]
    assert jlora.__version__ == project["project"]["version"]


def test_the_dataflow_domains_dispatch_through_tables():
    """One walker, two domains: primitive objects key the walker's control table and each
    domain's rules, as they key the interpreter's; no chain of `is lax.x_p`."""
    from jlora._src.interpret import example_axis, token_axes, walk

    for name in ("walk", "example_axis", "token_axes"):
        source = (ROOT / "_src" / "interpret" / f"{name}.py").read_text()
        assert "is lax." not in source and "primitive is" not in source
        assert "def analyze" not in source or "walk.Walker(" in source  # no walker of its own
    lax = jax.lax
    assert all(isinstance(p, jax.extend.core.Primitive) for p in walk.CONTROL)
    for p in (lax.scan_p, lax.while_p, lax.cond_p):
        assert p in walk.CONTROL
    for domain in (example_axis.Examples(), token_axes.Tokens()):
        assert isinstance(domain, walk.Domain)
        assert all(isinstance(p, jax.extend.core.Primitive) for p in domain.rules)
        for p in (lax.dot_general_p, lax.reshape_p, lax.transpose_p, lax.gather_p, lax.add_p):
            assert p in domain.rules


def test_the_evaluator_dispatches_on_the_value_type():
    """A probe (init learning axes) is its own value type with its own rules, registered
    beside the factored rule of the same primitive; no rule asks a value for a probe flag."""
    from jlora._src.interpret import core, sym

    lax = jax.lax
    assert issubclass(sym.Probe, sym.Sym) and not hasattr(sym.Sym, "probe")
    for p in (lax.dot_general_p, lax.gather_p, lax.reshape_p, lax.conv_general_dilated_p):
        assert p in core.PROBE_RULES and core.PROBE_RULES[p] is not core.RULES[p]
    assert set(core.PROBE_RULES) <= set(core.RULES)  # a probe rule refines a factored one
    for path in (ROOT / "_src" / "interpret").glob("*.py"):
        assert ".probe\n" not in path.read_text() and ".probe " not in path.read_text(), path


def test_importing_jlora_registers_every_format():
    """The formats register themselves when their modules are imported: ``import jlora``
    alone (a fresh interpreter) must make all of them known to ``quantize``."""
    import subprocess
    import sys

    code = "import jlora; from jlora._src.numerics import formats; print(sorted(formats.FORMATS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    known = "['fp8', 'fp8_block', 'int4', 'int8', 'mxfp4', 'mxfp8', 'nf4', 'nvfp4']"
    assert out.stdout.split("\n")[-2] == known
