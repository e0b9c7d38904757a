"""``jlora.Slots``: adapters loaded and evicted at run time over one base, every row equal
to its adapter run alone, nothing traced again, LRU and pinning, bad sources refused."""

import dataclasses
import threading

import jax
import numpy as np
import pytest

import jlora
from conftest import F32, randomize

KEY = jax.random.key(0)
PARAMS = {
    "l1": {"kernel": jax.random.normal(KEY, (16, 32)) / 4},
    "l2": {"kernel": jax.random.normal(jax.random.key(1), (32, 8)) / 4},
}
X = jax.random.normal(jax.random.key(2), (6, 16))


def fn(p, x):
    return jax.nn.relu(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]


def adapter(i, rank, **kw):
    cfg = jlora.LoraConfig(rank=rank, alpha=2.0 * rank + i, targets=("l1", "l2"), **kw)
    return randomize(jlora.init(jax.random.key(10 + i), PARAMS, cfg), jax.random.key(20 + i))


ADAPTERS = {
    "a": adapter(0, 2),
    "b": adapter(1, 8, rslora=True),
    "c": adapter(2, 4),
    "d": adapter(3, 1),
}
ROWS = 6  # every batch is padded to this many rows (None: the base alone)


def server(traces=None):
    """The jitted serving step; ``traces`` (a list) gets an entry each time it traces."""

    def serve(tree, x, ids):
        if traces is not None:
            traces.append(1)
        return jlora.apply(fn)(PARAMS, tree, x, adapter_ids=ids)

    return jax.jit(serve)


SERVE = server()


def check_rows(slots, names, serve=SERVE):
    names = list(names) + [None] * (ROWS - len(names))
    tree, ids = slots.batch(names)
    got = serve(tree, X, ids)
    for i, name in enumerate(names):
        want = (
            fn(PARAMS, X[i : i + 1])
            if name is None
            else jlora.apply(fn)(PARAMS, ADAPTERS[name], X[i : i + 1])
        )
        np.testing.assert_allclose(got[i : i + 1], want, **F32)


def test_rows_equal_their_adapter_alone_and_nothing_traces_again():
    traces: list = []
    slots = jlora.Slots(PARAMS, ADAPTERS["a"], 2, rank=8, sources=ADAPTERS)
    serve = server(traces)
    for names in (
        ["a", "b", None, "a"],
        ["c", "a", "c"],
        ["d", "b"],
        ["a", None, "d"],
        ["b", "c", "b", "c", "b", "c"],
    ):
        check_rows(slots, names, serve)
    # one trace, however many loads and evictions (counted in Python: the jit's own cache
    # size can drop to 0 when JAX evicts it in a long run, as it did once in the suite)
    assert len(traces) == 1
    assert slots.traces == 1  # ...and one trace of the slot write


def test_least_recently_used_is_evicted_and_pinned_ones_stay():
    slots = jlora.Slots(PARAMS, ADAPTERS["a"], 2, rank=8)
    assert slots.load("a", ADAPTERS["a"]) == 0 and slots.load("b", ADAPTERS["b"]) == 1
    slots.ids(["a"])  # a is now the most recently used
    assert slots.load("c", ADAPTERS["c"]) == 1 and set(slots.resident) == {"a", "c"}
    slots.pin("c")
    assert slots.load("d", ADAPTERS["d"]) == 0 and set(slots.resident) == {"c", "d"}
    check_rows(slots, ["d", "c"])
    slots.pin("d")
    with pytest.raises(jlora.LoraError, match="pinned or used by this batch"):
        slots.load("a", ADAPTERS["a"])
    slots.unpin("d")
    assert slots.ids(["a", "c"]).tolist() == [0, 1]  # reloaded from its source: d evicted
    with pytest.raises(jlora.LoraError, match="uses 3 adapters but there are 2 slots"):
        slots.ids(["a", "b", "c"])
    with pytest.raises(jlora.LoraError, match="'zz' was never loaded"):
        slots.ids(["zz"])
    slots.evict("a")
    assert set(slots.resident) == {"c"}


def test_sources_on_disk_jlora_and_peft(tmp_path):
    jlora.save_adapter(tmp_path / "a", ADAPTERS["a"])
    jlora.peft.save(str(tmp_path / "b"), ADAPTERS["b"])
    slots = jlora.Slots(
        PARAMS, ADAPTERS["a"], 2, sources={"a": tmp_path / "a", "b": str(tmp_path / "b")}, rank=8
    )
    check_rows(slots, ["b", "a", "b"])


def test_bad_sources_are_refused_and_change_nothing():
    slots = jlora.Slots(PARAMS, ADAPTERS["a"], 2, rank=4)
    slots.load("a", ADAPTERS["a"])
    tree = slots.tree
    one = randomize(jlora.init(KEY, PARAMS, jlora.LoraConfig(rank=2, targets=("l1",))), KEY)
    dora = randomize(
        jlora.init(KEY, PARAMS, jlora.LoraConfig(rank=2, targets=("l1", "l2"), dora=True)), KEY
    )
    alora = jlora.init(
        KEY, PARAMS, jlora.LoraConfig(rank=2, targets=("l1", "l2"), alora_invocation_tokens=(3,))
    )
    cases = [
        (ADAPTERS["b"], "rank 8, more than the slot rank 4"),
        (alora, "activated LoRA .* which slots do not serve yet"),
        (one, "targets differ from the slots' template: missing \\['l2/kernel'\\]"),
        (dora, "DoRA and plain LoRA adapters cannot share slots"),
    ]
    for source, match in cases:
        with pytest.raises(jlora.LoraError, match=match):
            slots.load("x", source)
    assert slots.resident == {"a": 0} and slots.tree is tree
    with pytest.raises(jlora.LoraError, match="at least one slot"):
        jlora.Slots(PARAMS, ADAPTERS["a"], 0)


def test_threads_share_the_slots():
    slots = jlora.Slots(PARAMS, ADAPTERS["a"], 3, rank=8, sources=ADAPTERS)
    errors = []

    def worker(k):
        try:
            for t in range(6):
                names = [list(ADAPTERS)[(k + t + j) % 4] for j in range(2)]
                tree, ids = slots.batch(names)
                got = SERVE(tree, X[:2], ids)  # (a tree and ids from the same moment)
                for i, name in enumerate(names):
                    want = jlora.apply(fn)(PARAMS, ADAPTERS[name], X[i : i + 1])
                    np.testing.assert_allclose(got[i : i + 1], want, **F32)
        except Exception as e:  # reported below, with the thread's number
            errors.append((k, e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_arrays_that_contradict_their_node_change_nothing():
    """Checked before any eviction or write: the residency, the tree and the traces stay."""
    slots = jlora.Slots(PARAMS, ADAPTERS["a"], 2, rank=4)
    slots.load("a", ADAPTERS["a"]), slots.load("c", ADAPTERS["c"])
    tree, resident, traces = slots.tree, slots.resident, slots.traces
    node = ADAPTERS["c"]["l1"]["kernel"]
    bad = {
        "l1": {"kernel": dataclasses.replace(node, a=node.a[:, :3])},  # rank 4 declared
        "l2": ADAPTERS["c"]["l2"],
    }
    with pytest.raises(jlora.LoraError, match="l1/kernel"):
        slots.load("x", bad)
    assert slots.resident == resident and slots.tree is tree and slots.traces == traces
    check_rows(slots, ["a", "c"])


def test_peft_sources_named_by_module_fn(tmp_path):
    """Slots take module_fn (and prefix) for PEFT directories named another way."""
    hf = lambda path, index: "model." + jlora.peft.default_module(path, index)
    jlora.peft.save(str(tmp_path / "b"), ADAPTERS["b"], module_fn=hf)
    with pytest.raises(jlora.LoraError, match="pass a module_fn"):
        jlora.Slots(PARAMS, ADAPTERS["a"], 2, rank=8).load("b", str(tmp_path / "b"))
    slots = jlora.Slots(
        PARAMS,
        ADAPTERS["a"],
        2,
        rank=8,
        module_fn=hf,
        sources={"a": ADAPTERS["a"], "b": str(tmp_path / "b")},
    )
    check_rows(slots, ["b", "a"])
    prefixed = jlora.Slots(
        PARAMS,
        ADAPTERS["a"],
        2,
        rank=8,
        prefix="base_model.model.model.",
        sources={"b": str(tmp_path / "b")},
    )
    check_rows(prefixed, ["b"])
