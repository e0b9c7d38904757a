"""Wall time of test files at XLA's default code generation and at LLVM level 0.

The suite runs at level 0 (``conftest.py`` says why); this measures what that buys, the
two levels interleaved in one run (``JLORA_TEST_XLA_OPT=default`` is XLA's default)::

    python benchmarks/codegen_level.py                 # test_qformats + test_quant
    python benchmarks/codegen_level.py --repeats 2 tests/test_apply.py

Prints a table of wall seconds per level (median, min-max over the repeats) and the ratio.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LEVELS = {"default": "default", "level 0": "0"}


def run(level: str, files: list[str]) -> float:
    env = {**os.environ, "JLORA_TEST_XLA_OPT": level}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2"]
    cmd += ["--dist", "worksteal", "-o", "addopts=", *files]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{level}: pytest failed\n{proc.stdout[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", default=["tests/test_qformats.py", "tests/test_quant.py"])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name in LEVELS}
    for _ in range(args.repeats):
        for name, level in LEVELS.items():  # interleaved: load drifts hit both alike
            times[name].append(run(level, args.files))
    print(f"`python benchmarks/codegen_level.py {' '.join(args.files)}` (pytest -n 2)\n")
    print("| code generation | wall s (median) | min-max |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.0f} | {min(ts):.0f}-{max(ts):.0f} |")
    ratio = statistics.median(times["level 0"]) / statistics.median(times["default"])
    print(f"\nlevel 0 / default: {ratio:.2f}")


if __name__ == "__main__":
    main()
