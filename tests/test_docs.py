"""The documentation: every Python block in README.md and docs/ runs, every public name
has a Google-style docstring and a place in the API reference, and the figures the
docs quote from the tests are the tests' own.

The blocks of one page run in order in one namespace (a page is one story), in a
temporary working directory.
"""

import importlib.util
import inspect
import os
import pathlib
import re
import typing

import jax
import pytest

import jlora

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
#: Public functions that raise nothing of their own (Raises: would be empty).
NO_RAISES = {"dequantize", "path_str", "peft.default_module", "peft.torch_module"}


def _blocks(page: pathlib.Path) -> list[str]:
    return BLOCK.findall(page.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "page", [p for p in PAGES if _blocks(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    blocks = _blocks(page)
    needed = set(re.findall(r"^import (\w+)|^from (\w+)", "\n".join(blocks), re.M))
    for name in {a or b for a, b in needed} - {"jlora"}:
        if importlib.util.find_spec(name) is None:  # an optional extra (torch, peft)
            pytest.skip(f"{page.name} needs {name} (pip install -e '.[test,interop]')")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs:{page.name}"}
    with jax.numpy_rank_promotion("allow"):  # the suite's "raise" is not a user's default
        for i, block in enumerate(blocks):
            exec(compile(block, f"{page.relative_to(ROOT)} block {i}", "exec"), namespace)


def _public():
    for name in jlora.__all__:
        if name not in ("peft", "memory"):
            yield name, getattr(jlora, name)
    for module in ("peft", "memory"):
        for name in getattr(jlora, module).__all__:
            yield f"{module}.{name}", getattr(getattr(jlora, module), name)


def test_every_public_callable_has_a_google_docstring_with_a_runnable_example():
    """Args, Returns, Raises and Examples (classes: Examples); the examples run as doctests
    (pytest --doctest-modules over jlora/, pyproject's addopts)."""
    missing = []
    for name, obj in _public():
        if obj is typing.Any or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue  # Params, Adapter: aliases, documented by their comments
        doc = inspect.getdoc(obj) or ""
        want = ["Examples:"]
        if inspect.isfunction(obj):
            want += ["Args:", "Returns:"] + ([] if name in NO_RAISES else ["Raises:"])
        missing += [f"{name}: {w}" for w in want if f"\n{w}\n" not in f"\n{doc}"]
    assert not missing, missing


def test_the_api_reference_lists_every_public_name():
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: jlora\.([\w.]+)", api, re.M))
    public = {
        n
        for n, obj in _public()
        if inspect.isfunction(obj) or inspect.isclass(obj) or n in ("PRESETS", "Params", "Adapter")
    }
    assert public - documented == set()


def test_reliability_figures_come_from_the_tests():
    """The counts of bad inputs and property cases in docs/reliability.md are the tests'."""
    from test_bad_inputs import CASES

    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    prop = (ROOT / "tests" / "test_property.py").read_text(encoding="utf-8")
    examples = sum(int(n) for n in re.findall(r"max_examples=(\d+)", prop))
    assert f"catalogue of {len(CASES)} user" in text and f"all {len(CASES)} do" in text
    assert f"{examples} generated cases" in text


def test_the_readme_fits_on_a_screen_and_links_into_the_docs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count("\n") <= 300
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert os.path.exists(ROOT / link), link
