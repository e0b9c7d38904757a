"""Mixed-adapter batches in every layout: the right numbers or a LoraError, never a wrong one.

Hypothesis draws a layout (examples first, second, flattened with the sequence
inside the model, transposed inside the model, vmapped from outside, scanned
over the sequence), the number of examples, their adapter ids (-1: the base)
and the sizes. The reference runs each example alone on the float64-merged
weight of its own adapter (``ref_merge``: numpy, no jlora code). Layouts that
mix the examples before a weight (interleaving them with the sequence,
summing over them) must raise.
"""

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jlora
from conftest import F32, close, randomize, ref_merge

D_IN, D_HID, D_OUT = 5, 7, 3


def _mlp(p, x):
    return jnp.tanh(x @ p["up"]) @ p["down"]


def _rnn(p, x):
    """``h_t = tanh(x_t up + h_{t-1} rec)`` over the sequence (axis 0): an adapted weight
    meets the carry, which starts as zeros shared by all examples."""

    def step(h, xt):
        h = jnp.tanh(xt @ p["up"] + h @ p["rec"])
        return h, h @ p["down"]

    return jax.lax.scan(step, jnp.zeros((x.shape[1], D_HID)), x)[1]


#: layout -> (model fn(p, x), example axis of x, example axis of the output, example_axes)
LAYOUTS = {
    "first": (_mlp, 0, 0, None),
    "second": (_mlp, 1, 1, 1),
    "flattened": (
        lambda p, x: _mlp(p, x.reshape(-1, D_IN)).reshape(x.shape[:2] + (D_OUT,)),
        0,
        0,
        None,
    ),
    "transposed": (lambda p, x: jnp.swapaxes(_mlp(p, jnp.swapaxes(x, 0, 1)), 0, 1), 0, 0, None),
    "scanned": (lambda p, x: jax.lax.scan(lambda c, xt: (c, _mlp(p, xt)), 0.0, x)[1], 1, 1, 1),
    "recurrent": (lambda p, x: _rnn(p, x), 1, 1, 1),
}
#: layouts that mix examples before a weight: these must raise
MIXING = {
    "interleaved": (lambda p, x: _mlp(p, jnp.swapaxes(x, 0, 1).reshape(-1, D_IN)), 0),
    "summed": (lambda p, x: _mlp(p, x.sum(0)), 0),
    "shared": (lambda p, x, pos: _mlp(p, x + pos[None]), 0),  # pos: one row per position
}


def _setup(n_adapters, seed):
    key = jax.random.key(seed)
    p = {
        "up": jax.random.normal(key, (D_IN, D_HID)) / 3,
        "down": jax.random.normal(jax.random.fold_in(key, 1), (D_HID, D_OUT)) / 3,
        "rec": jax.random.normal(jax.random.fold_in(key, 2), (D_HID, D_HID)) / 3,
    }
    ads = [
        randomize(
            jlora.init(
                jax.random.fold_in(key, 2 + i),
                p,
                jlora.LoraConfig(rank=1 + i % 3, alpha=2.0, targets=("up", "down", "rec")),
            ),
            jax.random.fold_in(key, 9 + i),
            scale=0.5,
        )
        for i in range(n_adapters)
    ]
    return p, ads


@st.composite
def cases(draw):
    n = draw(st.integers(1, 4))
    k = draw(st.integers(1, 3))
    return (
        draw(st.sampled_from(sorted(LAYOUTS))),
        n,
        k,
        draw(st.integers(1, 4)),
        draw(st.lists(st.integers(-1, k - 1), min_size=n, max_size=n)),
        draw(st.integers(0, 2**16)),
    )


@settings(max_examples=24, deadline=None, derandomize=True)
@given(cases())
def test_every_layout_computes_each_examples_own_adapter(case):
    layout, n, k, seq, ids, seed = case
    fn, x_axis, out_axis, example_axes = LAYOUTS[layout]
    p, ads = _setup(k, seed)
    shape = [seq, seq]
    shape[x_axis] = n
    x = jax.random.normal(jax.random.key(seed + 1), tuple(shape) + (D_IN,))
    got = jlora.apply(fn)(
        p, jlora.stack(ads), x, adapter_ids=jnp.array(ids), example_axes=example_axes
    )
    alone = [
        fn(p if i < 0 else ref_merge(p, ads[i]), jnp.take(x, jnp.array([j]), axis=x_axis))
        for j, i in enumerate(ids)
    ]
    close(got, jnp.concatenate(alone, axis=out_axis), F32)


def test_vmapped_from_outside():
    p, ads = _setup(2, 0)
    x = jax.random.normal(jax.random.key(1), (4, 3, 2, D_IN))  # (vmapped, examples, seq, d)
    ids = jnp.array([1, -1, 0])
    f = jlora.apply(_mlp)
    got = jax.vmap(lambda x: f(p, jlora.stack(ads), x, adapter_ids=ids))(x)
    want = jnp.stack(
        [_mlp(p if i < 0 else ref_merge(p, ads[i]), x[:, j]) for j, i in enumerate(ids.tolist())],
        axis=1,
    )
    close(got, want, F32)


@pytest.mark.parametrize("layout", sorted(MIXING))
def test_layouts_that_mix_examples_raise(layout):
    fn, _ = MIXING[layout]
    p, ads = _setup(2, 0)
    x = jax.random.normal(jax.random.key(1), (2, 2, D_IN))  # seq == examples: shapes can't tell
    args = (x, jnp.ones((2, D_IN))) if layout == "shared" else (x,)
    with pytest.raises(jlora.LoraError, match="example"):
        jlora.apply(fn)(p, jlora.stack(ads), *args, adapter_ids=jnp.array([1, 0]))


def test_the_issue_layout_is_refused_or_followed():
    """(seq, batch, d) = (4, 2, 8) with ids [1, 0] used to be off by 0.29 with no error."""
    p, ads = _setup(2, 3)
    x = jax.random.normal(jax.random.key(2), (4, 2, D_IN))
    f, st_, ids = jlora.apply(_mlp), jlora.stack(ads), jnp.array([1, 0])
    with pytest.raises(jlora.LoraError, match="no example axis 0 of size 2.*example_axes"):
        f(p, st_, x, adapter_ids=ids)
    got = f(p, st_, x, adapter_ids=ids, example_axes=1)
    want = jnp.stack([_mlp(ref_merge(p, ads[i]), x[:, j]) for j, i in enumerate([1, 0])], 1)
    close(got, want, F32)
    jitted = jax.jit(lambda p, a, x, ids: f(p, a, x, adapter_ids=ids, example_axes=1))
    close(jitted(p, st_, x, ids), got, F32)
