"""One command for an accelerator: the core timing table, the serve table and the memory
table, written with the device named.

On a GPU or TPU: ``python benchmarks/accelerator.py`` runs ``core.py`` (bench-size model:
forward, LoRA/DoRA/full/frozen/merge-on-the-fly steps), ``serve.py`` (prefill and decode,
1-64 adapters) and ``memory.py`` (XLA ``memory_analysis()`` on that backend, bench and
Llama-7B shapes, with and without remat), each in its own process, and writes
``benchmarks/results/accelerator_<platform>.md``. ``--quick`` runs tiny versions of all
three (on this CPU in ``tests/test_benchmarks.py``, so the entry point cannot rot) and
writes nothing.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def runs(quick: bool, out: str) -> dict:
    """``{title: argv}`` of the three tables."""
    if quick:
        return {
            "core": ["core.py", "--quick", "--repeats", "1", "--out", out],
            "serve": ["serve.py", "--quick", "--repeats", "1", "--counts", "4"],
            "memory": [
                "memory.py",
                "--sizes",
                "tiny",
                "--batch",
                "1",
                "--seq",
                "16",
                "--remat",
                "only",
                "--qtypes",  # one format of each kind: the table's code is the same for all
                "nf4",
                "mxfp4",
                "--out",
                os.path.join(out, "memory.md"),
            ],
        }
    return {
        "core": ["core.py", "--repeats", "5", "--out", out],
        "serve": ["serve.py", "--repeats", "5"],
        "memory": ["memory.py", "--remat", "also", "--out", os.path.join(out, "memory.md")],
    }


def _shown(cmd) -> str:
    """The command without its temporary ``--out`` folder."""
    keep = [c for i, c in enumerate(cmd) if c != "--out" and (i == 0 or cmd[i - 1] != "--out")]
    return " ".join(keep)


def device_line() -> str:
    import jax

    d = jax.devices()
    return f"{len(d)} x {d[0].device_kind} ({d[0].platform}), jax {jax.__version__}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny tables, nothing written")
    args = ap.parse_args(argv)
    device = device_line()
    parts = [f"# Benchmarks on {device}", ""]
    with tempfile.TemporaryDirectory() as out:
        for title, cmd in runs(args.quick, out).items():
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, *cmd], cwd=HERE, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            parts += [
                f"## {title}: `python benchmarks/{_shown(cmd)}` ({time.perf_counter() - t0:.0f} s)",
                "",
                proc.stdout.strip(),
                "",
            ]
            print(f"{title}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    text = "\n".join(parts)
    print(text)
    if not args.quick:
        import jax

        name = f"accelerator_{jax.devices()[0].platform}.md"
        with open(os.path.join(HERE, "results", name), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
