"""Property test: any dot_general layout of an adapted weight equals the materialized one."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jlora
from conftest import check_against_materialized


@st.composite
def layouts(draw):
    """A kernel with stacked/in/out axes, and a dot_general that uses it."""
    n_in, n_out, n_stack = (draw(st.integers(1, 2)), draw(st.integers(1, 2)),
                            draw(st.integers(0, 2)))
    roles = ["i"] * n_in + ["o"] * n_out + ["s"] * n_stack
    roles = draw(st.permutations(roles))
    shape = tuple(draw(st.integers(2, 4)) for _ in roles)
    axes = {k: tuple(ax for ax, r in enumerate(roles) if r == k) for k in "sio"}
    contract = draw(st.sampled_from("io"))  # contracting the "out" axes is the x @ W.T use
    batched = [ax for ax in axes["s"] if draw(st.booleans())]
    n_free_x = draw(st.integers(0, 2))
    x_axes = draw(st.permutations([("c", ax) for ax in axes[contract]]
                                  + [("b", ax) for ax in batched]
                                  + [("f", n) for n in range(n_free_x)]))
    x_shape = tuple(shape[ax] if kind != "f" else 3 for kind, ax in x_axes)
    xc = [x_axes.index(("c", ax)) for ax in axes[contract]]
    xb = [x_axes.index(("b", ax)) for ax in batched]
    dims = ((xc, list(axes[contract])), (xb, batched))
    sizes = lambda k: int(np.prod([shape[ax] for ax in axes[k]]))
    rank = draw(st.integers(1, min(sizes("i"), sizes("o"))))
    return shape, axes, x_shape, dims, rank, draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=30, deadline=None)
@given(layouts())
def test_any_dot_general_layout_matches_materialized(layout):
    shape, axes, x_shape, ((xc, wc), (xb, wb)), rank, w_is_lhs, seed = layout
    key = jax.random.key(seed)
    stack = tuple(shape[ax] for ax in axes["s"])
    size = lambda k: int(np.prod([shape[ax] for ax in axes[k]]))
    node = jlora.LoraNode(
        a=jax.random.normal(key, stack + (size("i"), rank)) * 0.3,
        b=jax.random.normal(jax.random.fold_in(key, 1), stack + (rank, size("o"))) * 0.3,
        rank=rank, alpha=2.0 * rank, scale=2.0, dropout=0.0, shape=shape,
        stack_axes=axes["s"], in_axes=axes["i"], out_axes=axes["o"])
    params = {"w": jax.random.normal(jax.random.fold_in(key, 2), shape)}
    x = jax.random.normal(jax.random.fold_in(key, 3), x_shape)
    if w_is_lhs:
        fn = lambda p, x: jax.lax.dot_general(p["w"], x, ((wc, xc), (wb, xb)))
    else:
        fn = lambda p, x: jax.lax.dot_general(x, p["w"], ((xc, wc), (xb, wb)))
    assert jlora.explain(fn, params, {"w": node}, x) == {"w": ["factored"]}
    check_against_materialized(fn, params, {"w": node}, x)


@settings(max_examples=15, deadline=None)
@given(st.permutations([0, 1, 2]), st.integers(0, 2), st.integers(0, 2**16))
def test_transpose_and_slicing_stay_symbolic(perm, layer, seed):
    """A stacked (L, in, out) kernel transposed and indexed, then contracted."""
    key = jax.random.key(seed)
    params = {"w": jax.random.normal(key, (3, 6, 5))}
    ad = jlora.init(key, params, jlora.LoraConfig(rank=2, targets=("w",)))
    ad = jax.tree.map(lambda v: jax.random.normal(key, v.shape) * 0.3, ad)
    inv = np.argsort(perm)

    def fn(p, x):
        w = jnp.transpose(p["w"], perm)  # the model stores or views it permuted
        w = jnp.transpose(w, inv)[layer]  # ...and indexes one layer
        return x[:, 1:] @ w[1:, ::2] + (x @ w)[:, :1]

    x = jax.random.normal(jax.random.fold_in(key, 1), (4, 6))
    assert jlora.explain(fn, params, ad, x)["w"] == ["factored", "factored"]
    check_against_materialized(fn, params, ad, x)
