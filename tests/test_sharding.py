"""Sharding on 8 virtual CPU devices (``sharded_cases.py`` in a subprocess: the device
count is fixed when JAX starts) and a two-process data-parallel run."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _env(devices: int) -> dict:
    """This process's environment with ``devices`` CPU devices (its other XLA flags kept)."""
    flags = os.environ.get("XLA_FLAGS", "")
    return {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}"}


@pytest.mark.parametrize("cases, count", [("sharded_cases.py", 51), ("explicit_cases.py", 15)])
def test_sharded_cases_on_8_devices(cases, count):
    """Auto and explicit meshes (``sharded_cases``), sharding-aware models (``explicit_cases``)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-o",
            "addopts=",
            "-q",
            "-p",
            "no:cacheprovider",
            os.path.join(HERE, cases),
        ],
        env=_env(8),
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"{count} passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(n: int, out) -> None:
    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "multiprocess_worker.py"),
                address,
                str(n),
                str(i),
                str(out),
            ],
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    for p in procs:
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log[-4000:]


def test_two_processes_train_the_same_adapter_as_one(tmp_path):
    _run(2, tmp_path / "two.npz")
    _run(1, tmp_path / "one.npz")
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert len(one.files) == len(two.files) > 0
    for k in one.files:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6)
    assert any(np.abs(one[k]).max() > 0 for k in one.files)
