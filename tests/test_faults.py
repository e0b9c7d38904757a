"""Faults during saves and loads: a failed or killed save never costs the last good checkpoint.

Real faults, not mocks: a child process killed with SIGKILL mid-save, a child whose
file-size limit (RLIMIT_FSIZE) fails its writes with EFBIG the way a full disk fails
them with ENOSPC, a directory made read-only (chmod, or ``chattr +i`` when running as
root, where permission bits do not apply), and loads from many threads at once.
"""

import concurrent.futures
import hashlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora

TESTS = os.path.dirname(os.path.abspath(__file__))
SMALL = {"q_proj": {"kernel": jnp.ones((64, 64))}}


def _adapter(params, rank, seed):
    ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=rank, targets=("q_proj",)))
    leaves, tree = jax.tree.flatten(ad)  # random values: orbax compresses constant arrays
    return jax.tree.unflatten(
        tree, [jax.random.normal(jax.random.key(seed + i), v.shape) for i, v in enumerate(leaves)]
    )


SAVE = {
    "adapter": lambda root, ad: jlora.save_adapter(root, ad),
    "state": lambda root, ad: jlora.save_checkpoint(root, _next_step(root), ad),
    "peft": lambda root, ad: jlora.peft.save(root, ad),
}
LOAD = {
    "adapter": lambda root: jlora.load_adapter(root, SMALL),
    "state": lambda root: jlora.restore_checkpoint(root, _adapter(SMALL, 4, 0))[0],
    "peft": lambda root: jlora.peft.load(root, SMALL),
}


def _next_step(root) -> int:
    steps = [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []
    return max(steps, default=0) + 1


def _files(root) -> dict:
    """Hashes of the files of the complete checkpoint (orbax's unfinished tmp folders aside)."""
    out = {}
    for d, dirs, fs in os.walk(root):
        dirs[:] = [x for x in dirs if "tmp" not in x]
        for f in fs:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(
                    fh.read()
                ).hexdigest()
    return out


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


_FULL_DISK_CHILD = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, sys.argv[3])
    import jax.numpy as jnp
    from test_faults import SAVE, _adapter
    root, kind = sys.argv[1], sys.argv[2]
    big = _adapter({"q_proj": {"kernel": jnp.ones((64, 4096))}}, 64, 1)  # ~1 MB
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    try:
        SAVE[kind](root, big)
        print("saved")
    except Exception as e:
        print("raised", type(e).__name__, getattr(e, "__notes__", ""))
""")


def _saved(tmp_path, kind):
    """A good checkpoint of ``kind`` on disk: its directory, the adapter, its files' hashes."""
    root, old = str(tmp_path / "ckpt"), _adapter(SMALL, 4, 7)
    SAVE[kind](root, old)
    return root, old, _files(root)


@pytest.mark.parametrize("kind", list(SAVE))
def test_save_to_a_full_disk_fails_loudly_and_keeps_the_old_checkpoint(tmp_path, kind):
    root, old, before = _saved(tmp_path, kind)
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CHILD, root, kind, TESTS],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "raised" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    if kind != "peft":  # jlora's note on orbax's error
        assert "previous checkpoint there (if any) is untouched" in proc.stdout
    assert _files(root) == before
    _same(LOAD[kind](root), old)
    SAVE[kind](root, _adapter(SMALL, 4, 8))  # the next save works and replaces it
    _same(LOAD[kind](root), _adapter(SMALL, 4, 8))


def _read_only(path):
    """Make ``path`` read-only for this process; return the undo function."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return lambda: os.chmod(path, 0o755)
    proc = subprocess.run(["chattr", "+i", path], capture_output=True, text=True)
    if proc.returncode:  # pragma: no cover - a root without CAP_LINUX_IMMUTABLE
        pytest.skip(
            f"running as root and chattr +i failed ({proc.stderr.strip()}): no way "
            "to make a directory read-only for root here"
        )
    return lambda: subprocess.run(["chattr", "-i", path], check=True)


@pytest.mark.parametrize("kind", list(SAVE))
def test_save_to_a_read_only_directory_fails_loudly_and_keeps_the_old_files(tmp_path, kind):
    root, old, before = _saved(tmp_path, kind)
    undo = _read_only(root)
    try:
        with pytest.raises(OSError):
            SAVE[kind](root, _adapter(SMALL, 4, 8))
    finally:
        undo()
    assert _files(root) == before
    assert not [f for f in os.listdir(tmp_path) if f != "ckpt"]  # no debris beside it
    _same(LOAD[kind](root), old)


# A child-script fragment: kill this process with SIGKILL once orbax's temporary directory
# appears under ``root``, i.e. in the middle of a save.
WATCH_AND_KILL = textwrap.dedent("""
    def watch():
        while True:
            for _, dirs, _ in os.walk(root):
                if any("tmp" in d for d in dirs):
                    print("killing mid-save", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0005)
""")

_KILLED_CHILD = (
    textwrap.dedent("""
    import os, signal, sys, threading, time
    sys.path.insert(0, sys.argv[2])
    import conftest  # noqa: F401 (the tests' settings and the examples on sys.path)
    from test_faults import run_with_checkpoints
    root = sys.argv[1]
""")
    + WATCH_AND_KILL
    + textwrap.dedent("""
    run_with_checkpoints(root, 3, 0)  # step 3 saved in full
    threading.Thread(target=watch, daemon=True).start()
    run_with_checkpoints(root, 3, 3)  # the save of step 6 is killed
    print("save finished before the kill", flush=True)
""")
)


def _setup():
    from test_train import Scanned, X

    params = Scanned().init(jax.random.key(0), X)
    cfg = jlora.LoraConfig(rank=4, targets=("q_proj", "v_proj"), dropout=0.1)
    ad = jlora.init(jax.random.key(1), params, cfg)
    tx = jlora.loraplus(optax.adamw, 1e-2, weight_decay=0.01)
    return params, ad, tx


def run_with_checkpoints(root, steps, start):
    """Train ``steps`` steps from the checkpoint at ``start`` (or from init), then save."""
    from test_train import _train

    params, ad, tx = _setup()
    state = {"adapter": ad, "opt": tx.init(ad)}
    if start:
        state, meta = jlora.restore_checkpoint(root, state)
        assert meta["step"] == start
    ad, opt = _train(params, state["adapter"], state["opt"], tx, steps, start=start)
    jlora.save_checkpoint(
        root, start + steps, {"adapter": ad, "opt": opt}, data_position=start + steps
    )
    return ad


def test_training_killed_mid_save_resumes_exactly(tmp_path):
    from test_train import _train

    root = str(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, root, TESTS],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-2000:]
    assert "killing mid-save" in proc.stdout
    resumed = run_with_checkpoints(root, 3, 3)  # the last good checkpoint is step 3
    params, ad, tx = _setup()
    straight, _ = _train(params, ad, tx.init(ad), tx, 6)
    _same(resumed, straight)


def test_concurrent_loads_of_one_adapter_agree(tmp_path):
    ad = _adapter(SMALL, 4, 3)
    jlora.save_adapter(tmp_path / "jl", ad)
    jlora.peft.save(str(tmp_path / "pf"), ad)
    loads = [
        lambda: jlora.load_adapter(tmp_path / "jl", SMALL),
        lambda: jlora.peft.load(str(tmp_path / "pf"), SMALL),
    ] * 8
    with concurrent.futures.ThreadPoolExecutor(len(loads)) as pool:
        results = list(pool.map(lambda f: f(), loads))
    for got in results:
        _same(got, ad)


@pytest.mark.parametrize("kind", ["adapter", "state"])
def test_a_load_never_deletes_a_save_in_progress(tmp_path, kind):
    """Loading from a directory another process is saving into leaves its unfinished save be.

    orbax's manager removes unfinished saves in a background thread when it opens a
    directory and does not wait for it on close: a reader that did so deleted a live
    writer's folder, and raced the next save's own clean-up (a FileNotFoundError in CI).
    """
    root, old, _ = _saved(tmp_path, kind)
    live = os.path.join(root, f"{_next_step(root)}.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(live, "state"))
    with open(os.path.join(live, "state", "part"), "wb") as fh:
        fh.write(b"a save in progress")
    _same(LOAD[kind](root), old)
    for _ in range(40):  # the removal, if any, runs in the background: give it 2 s
        assert os.path.exists(os.path.join(live, "state", "part"))
        time.sleep(0.05)


def test_a_normal_save_and_load_logs_no_warning(tmp_path, caplog):
    """orbax's absl warnings about a reader's read-only manager do not reach the user."""
    params = {"q_proj": {"kernel": jnp.ones((4, 6))}}
    ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets=("q_proj",)))
    with caplog.at_level(logging.WARNING):
        jlora.save_adapter(tmp_path / "ad", ad)
        jlora.load_adapter(tmp_path / "ad", params)
        jlora.save_checkpoint(tmp_path / "ck", 1, ad)
        jlora.restore_checkpoint(tmp_path / "ck", ad)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
