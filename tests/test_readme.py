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
