"""LoRA+ learning rates, optimizer state size, orbax adapters and exact resume."""

import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import llama
import numpy as np
import optax
import pytest
from test_apply import Scanned, X
from test_faults import WATCH_AND_KILL

import jlora
from conftest import randomize, scanned
from jlora._src.adapter import adapter_nodes

GRAD = 0.5  # every gradient entry in the SGD checks


def _adapter(key, shape=(8, 8), names=("q_proj",)):
    params = {n: {"kernel": jnp.ones(shape)} for n in names}
    return jlora.init(key, params, jlora.LoraConfig(rank=2, targets=names))


@pytest.mark.parametrize("lr", [0.1, optax.linear_schedule(0.1, 0.0, 4)])
def test_loraplus_sgd_step_is_exact(key, lr):
    ad = _adapter(key, names=("q_proj", "embed_tokens"))
    tx = jlora.loraplus(optax.sgd, learning_rate=lr, ratio=16.0, embedding_lr=1e-3)
    grads = jax.tree.map(lambda v: jnp.full_like(v, GRAD), ad)
    state = tx.init(ad)
    for step in range(2):
        upd, state = tx.update(grads, state, ad)
        a_lr = lr(step) if callable(lr) else lr
        np.testing.assert_allclose(upd["q_proj"]["kernel"].a, -a_lr * GRAD, rtol=1e-6)
        np.testing.assert_allclose(upd["q_proj"]["kernel"].b, -16.0 * a_lr * GRAD, rtol=1e-6)
        np.testing.assert_allclose(upd["embed_tokens"]["kernel"].a, -1e-3 * GRAD, rtol=1e-6)
        np.testing.assert_allclose(upd["embed_tokens"]["kernel"].b, -1e-3 * GRAD, rtol=1e-6)


def test_loraplus_groups_follow_peft():
    tree = {
        "q": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 4)), "magnitude": jnp.ones(4)},
        "embed_tokens": {"a": jnp.ones((4, 2))},
        "bias": jnp.ones(3),
    }
    assert jlora._src.optim.labels(tree) == {
        "q": {"a": "a", "b": "b", "magnitude": "b"},
        "embed_tokens": {"a": "embedding"},
        "bias": "b",
    }


def test_optimizer_state_is_proportional_to_the_adapter_not_the_base(key):
    params = llama.init_params(llama.LlamaConfig(), key)
    ad = jlora.init(key, params, jlora.LoraConfig.preset("quick"))
    size = lambda t: sum(np.size(x) for x in jax.tree.leaves(t))
    state = jlora.loraplus(optax.adamw, 1e-3).init(ad)
    n_scalars = sum(np.size(x) == 1 for x in jax.tree.leaves(state))
    assert size(state) - n_scalars == 2 * size(ad)  # Adam's mu and nu, nothing else
    assert size(state) < 0.05 * size(params)


def test_adapter_round_trip_and_size_proportional_to_rank(key, tmp_path):
    params = {"q_proj": {"kernel": jnp.ones((3, 256, 256))}}
    sizes = {}
    for rank in (4, 16):
        cfg = jlora.LoraConfig(rank=rank, alpha=8.0, targets=("q_proj",), rslora=True)
        ad = randomize(jlora.init(key, params, cfg, scanned(("q_proj", "kernel"))), key)
        jlora.save_adapter(tmp_path / f"r{rank}", ad)
        back = jlora.load_adapter(tmp_path / f"r{rank}")
        assert adapter_nodes(back).keys() == adapter_nodes(ad).keys()
        for n, m in zip(adapter_nodes(back).values(), adapter_nodes(ad).values()):
            assert (n.rank, n.alpha, n.scale, n.in_axes, n.stack_axes) == (
                m.rank,
                m.alpha,
                m.scale,
                m.in_axes,
                m.stack_axes,
            )
            np.testing.assert_array_equal(n.a, m.a)
            np.testing.assert_array_equal(n.b, m.b)
        sizes[rank] = sum(
            f.stat().st_size for f in (tmp_path / f"r{rank}").rglob("*") if f.is_file()
        )
    assert 3.5 < sizes[16] / sizes[4] < 4.1, sizes


def test_load_adapter_with_params_has_the_init_structure(key, tmp_path):
    params = Scanned().init(key, X)
    ad = randomize(jlora.init(key, params, jlora.LoraConfig(targets=("q_proj",))), key)
    jlora.save_adapter(tmp_path / "ad", ad)
    back = jlora.load_adapter(tmp_path / "ad", params)
    assert jax.tree.structure(back) == jax.tree.structure(ad)
    traces = []
    run = jlora.apply(Scanned().apply)
    f = jax.jit(lambda p, a, x: traces.append(1) or run(p, a, x))  # counts jit's traces
    np.testing.assert_array_equal(f(params, back, X), f(params, ad, X))
    # the loaded adapter reuses the compiled function: one trace (counted by tracing
    # itself; the jit fast path's _cache_size() read 0 once in a full -n 2 run)
    assert len(traces) == 1
    other = {"params": {"layers": {"q_proj": {"kernel": jnp.ones((3, 16, 8))}}}}
    with pytest.raises(jlora.LoraError, match="another base"):
        jlora.load_adapter(tmp_path / "ad", other)
    with pytest.raises(jlora.LoraError, match="do not have"):
        jlora.load_adapter(tmp_path / "ad", {"params": {}, "w": jnp.ones(2)})


def test_load_adapter_errors(tmp_path):
    with pytest.raises(jlora.LoraError, match="no adapter directory"):
        jlora.load_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(jlora.LoraError, match="no complete checkpoint"):
        jlora.load_adapter(tmp_path / "empty")


def _train(params, ad, opt_state, tx, steps, start=0):
    lora = jlora.apply(Scanned().apply)

    @jax.jit
    def step(ad, opt_state, i):
        key = jax.random.fold_in(jax.random.key(3), i)  # data and dropout keyed by position
        x = jax.random.normal(key, X.shape)
        loss = lambda ad: jnp.mean((lora(params, ad, x, lora_rng=key) - x) ** 2)
        updates, opt_state = tx.update(jax.grad(loss)(ad), opt_state, ad)
        return optax.apply_updates(ad, updates), opt_state

    for i in range(start, start + steps):
        ad, opt_state = step(ad, opt_state, i)
    return ad, opt_state


def test_resume_after_k_steps_is_bit_identical(key, tmp_path):
    params = Scanned().init(key, X)
    cfg = jlora.LoraConfig(rank=4, targets=("q_proj", "v_proj"), dropout=0.1)
    ad0 = jlora.init(key, params, cfg)
    tx = jlora.loraplus(optax.adamw, 1e-2, weight_decay=0.01)
    straight, _ = _train(params, ad0, tx.init(ad0), tx, 6)

    ad, opt_state = _train(params, ad0, tx.init(ad0), tx, 3)
    jlora.save_checkpoint(tmp_path, 3, {"adapter": ad, "opt": opt_state}, data_position=3)
    fresh = jlora.init(jax.random.key(123), params, cfg)  # structure only
    state, meta = jlora.restore_checkpoint(tmp_path, {"adapter": fresh, "opt": tx.init(fresh)})
    assert meta == {"step": 3, "data_position": 3}
    resumed, _ = _train(params, state["adapter"], state["opt"], tx, 3, start=meta["data_position"])
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(a, b)


_CHILD = (
    textwrap.dedent("""
    import os, signal, sys, threading, time
    import jax.numpy as jnp, jlora
    root, kind = sys.argv[1], sys.argv[2]
    small = {"q_proj": {"kernel": jnp.ones((64, 64))}}
    big = {"q_proj": {"kernel": jnp.ones((64, 4096))}}
    ad = lambda p, v, r: jax.tree.map(lambda x: x * 0 + v, jlora.init(
        jax.random.key(0), p, jlora.LoraConfig(rank=r, targets=("q_proj",))))
    import jax
    save = (lambda t, s: jlora.save_checkpoint(root, s, t)) if kind == "state" else (
        lambda t, s: jlora.save_adapter(root, t))
    save(ad(small, 1.0, 4), 1)
""")
    + WATCH_AND_KILL
    + textwrap.dedent("""
    threading.Thread(target=watch, daemon=True).start()
    save(ad(big, 2.0, 64), 2)
    print("save finished before the kill", flush=True)
""")
)


@pytest.mark.parametrize("kind", ["state", "adapter"])
def test_save_killed_mid_way_leaves_previous_checkpoint(tmp_path, kind):
    root = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), kind], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "killing mid-save" in proc.stdout
    like = {
        "q_proj": {
            "kernel": jlora.init(
                jax.random.key(0),
                {"x": jnp.ones((64, 64))},
                jlora.LoraConfig(rank=4, targets=("x",)),
            )["x"]
        }
    }
    if kind == "state":
        state, meta = jlora.restore_checkpoint(root, like)
        assert meta["step"] == 1
    else:
        state = jlora.load_adapter(root)
    node = state["q_proj"]["kernel"]
    assert node.a.shape == (64, 4) and float(node.a.min()) == float(node.a.max()) == 1.0
    jlora.save_checkpoint(root, 3, like) if kind == "state" else jlora.save_adapter(root, like)
