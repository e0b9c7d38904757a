"""The accelerator entry point runs end to end (tiny tables, on this CPU), so it cannot rot
before a session with a GPU or TPU runs it for real."""

import os
import subprocess
import sys

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def test_accelerator_entry_point_quick():
    proc = subprocess.run(
        [sys.executable, "accelerator.py", "--quick"],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "# Benchmarks on 1 x cpu (cpu)" in out
    for row in (
        "| lora_step |",
        "| frozen_step |",
        "| mixed 4 |",
        "**decode: one token",
        "| tiny (remat) | lora |",
        "| tiny (remat) | qlora |",
    ):
        assert row in out, row
    assert "--out" not in out  # the temporary folder is not shown as part of the command


def test_inits_benchmark_quick():
    proc = subprocess.run(
        [sys.executable, "inits.py", "--quick"],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| pissa")]
    assert len(rows) == 5 and rows[0].endswith("| 1.0000 |"), proc.stdout
