"""How far the main example clears its bar, over seeds and CPU numeric settings.

``examples/train_tasks.py`` passes when every adapter's answer accuracy is above
90% (and the base's below 30%). Its result depends on the seed and on the order
in which XLA's CPU backend reduces, which the number of threads it may use
changes (as another CPU would). This script runs the example for every seed
under each thread setting (``taskset``: one core, or two) and prints the
minimum and median accuracy and exact match per task.

Run: python benchmarks/example_margin.py                      (the example as it ships)
     python benchmarks/example_margin.py --tasks reverse --steps 800 --jobs 2
Each run pretrains its own base (per seed and thread setting, cached under --out).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "examples", "train_tasks.py")
CORES = {"1": "0", "2": "0,1"}  # threads -> the cores taskset allows
ROW = re.compile(r"^(\w+)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%\s")
RESULTS = os.path.join(HERE, "results")


def run(seed: int, threads: str, extra: list, out: str) -> dict:
    """Runs the example once; returns {task: (adapter accuracy, exact match)} in %."""
    cmd = [
        "taskset",
        "-c",
        CORES[threads],
        sys.executable,
        EXAMPLE,
        "--seed",
        str(seed),
        "--out",
        os.path.join(out, f"seed{seed}-threads{threads}"),
    ] + extra
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rows = {m[1]: (float(m[3]), float(m[4])) for m in map(ROW.match, proc.stdout.splitlines()) if m}
    print(
        f"seed {seed} threads {threads}: {rows} ({time.perf_counter() - t0:.0f} s, "
        f"exit {proc.returncode})",
        flush=True,
    )
    if not rows:
        sys.exit(f"no result table in the output of {' '.join(cmd)}:\n{proc.stderr[-2000:]}")
    return rows


def table(results: list) -> str:
    """Markdown: min and median adapter accuracy and exact match per task."""
    tasks = list(results[0][2])
    lines = [
        "| task | accuracy min | accuracy median | exact match min | exact match median |",
        "|---|---|---|---|---|",
    ]
    for t in tasks:
        acc = [r[2][t][0] for r in results]
        exact = [r[2][t][1] for r in results]
        lines.append(
            f"| {t} | {min(acc):.1f}% | {statistics.median(acc):.1f}% | "
            f"{min(exact):.1f}% | {statistics.median(exact):.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1")
    p.add_argument("--threads", default="1,2", help="comma-separated, of 1 and 2")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--out", default=os.path.join(HERE, "..", "examples", ".cache", "margin"))
    p.add_argument("--json", help="write the per-run results here")
    args, extra = p.parse_known_args()  # the rest goes to the example (--steps, --tasks...)
    grid = [(s, t) for s in range(args.seeds) for t in args.threads.split(",")]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
        found = list(pool.map(lambda st: run(*st, extra, args.out), grid))
    results = [(s, t, r) for (s, t), r in zip(grid, found)]
    print(
        f"\nexample settings: {' '.join(extra) or 'as shipped'}; seeds 0-{args.seeds - 1}, "
        f"threads {args.threads} ({len(results)} runs)\n"
    )
    print(table(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"settings": extra, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
