"""The README's quickstart block runs as written."""

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_quickstart_runs():
    text = open(README, encoding="utf-8").read()
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(block, "README quickstart", "exec"), namespace)
    assert namespace["merged"] is not None
    assert {"q_proj", "v_proj"} <= set(namespace["adapter"]["params"])


def test_reliability_figures_come_from_the_tests():
    """The README's counts of bad inputs and property cases are the test files' own."""
    from test_bad_inputs import CASES
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Reliability"):text.index("## Presets")]
    prop = open(os.path.join(os.path.dirname(__file__), "test_property.py")).read()
    examples = sum(int(n) for n in re.findall(r"max_examples=(\d+)", prop))
    assert f"catalogue of {len(CASES)} user" in section and f"all {len(CASES)} do" in section
    assert f"{examples} generated cases" in section
