"""Property test: any dot_general layout of an adapted weight equals the materialized one."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jlora
from conftest import BF16, F32, check_against_materialized, ref_weight
from jlora._src.numerics import quant


@st.composite
def layouts(draw):
    """A kernel with stacked/in/out axes, and a dot_general that uses it."""
    n_in, n_out, n_stack = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 2)),
        draw(st.integers(0, 2)),
    )
    roles = ["i"] * n_in + ["o"] * n_out + ["s"] * n_stack
    roles = draw(st.permutations(roles))
    shape = tuple(draw(st.integers(2, 4)) for _ in roles)
    axes = {k: tuple(ax for ax, r in enumerate(roles) if r == k) for k in "sio"}
    contract = draw(st.sampled_from("io"))  # contracting the "out" axes is the x @ W.T use
    batched = [ax for ax in axes["s"] if draw(st.booleans())]
    n_free_x = draw(st.integers(0, 2))
    x_axes = draw(
        st.permutations(
            [("c", ax) for ax in axes[contract]]
            + [("b", ax) for ax in batched]
            + [("f", n) for n in range(n_free_x)]
        )
    )
    x_shape = tuple(shape[ax] if kind != "f" else 3 for kind, ax in x_axes)
    xc = [x_axes.index(("c", ax)) for ax in axes[contract]]
    xb = [x_axes.index(("b", ax)) for ax in batched]
    dims = ((xc, list(axes[contract])), (xb, batched))
    sizes = lambda k: int(np.prod([shape[ax] for ax in axes[k]]))
    rank = draw(st.integers(1, min(sizes("i"), sizes("o"))))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    return (
        shape,
        axes,
        x_shape,
        dims,
        rank,
        draw(st.booleans()),
        draw(st.integers(0, 2**16)),
        dtype,
    )


@settings(max_examples=16, deadline=None, derandomize=True)
@given(layouts())
def test_any_dot_general_layout_matches_materialized(layout):
    shape, axes, x_shape, ((xc, wc), (xb, wb)), rank, w_is_lhs, seed, dtype = layout
    contract = "i" if tuple(wc) == axes["i"] else "o"
    key = jax.random.key(seed)
    stack = tuple(shape[ax] for ax in axes["s"])
    size = lambda k: int(np.prod([shape[ax] for ax in axes[k]]))
    node = jlora.LoraNode(
        a=jax.random.normal(key, stack + (size("i"), rank)) * 0.3,
        b=jax.random.normal(jax.random.fold_in(key, 1), stack + (rank, size("o"))) * 0.3,
        rank=rank,
        alpha=2.0 * rank,
        dropout=0.0,
        shape=shape,
        stack_axes=axes["s"],
        in_axes=axes["i"],
        out_axes=axes["o"],
    )
    params = {"w": jax.random.normal(jax.random.fold_in(key, 2), shape)}
    x = jax.random.normal(jax.random.fold_in(key, 3), x_shape)
    node, params, x = jax.tree.map(lambda v: v.astype(dtype), (node, params, x))
    if w_is_lhs:
        fn = lambda p, x: jax.lax.dot_general(p["w"], x, ((wc, xc), (wb, xb)))
    else:
        fn = lambda p, x: jax.lax.dot_general(x, p["w"], ((xc, wc), (xb, wb)))
    (use,) = jlora.explain(fn, params, {"w": node}, x)["w"]
    assert use == ("factored" if contract == "i" else jlora._src.interpret.uses.TRANSPOSED)
    check_against_materialized(
        fn, params, {"w": node}, x, tol=F32 if dtype == jnp.float32 else BF16
    )


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.permutations([0, 1, 2]), st.integers(0, 2), st.integers(0, 2**16))
def test_transpose_and_slicing_stay_symbolic(perm, layer, seed):
    """A stacked (L, in, out) kernel transposed and indexed, then contracted."""
    key = jax.random.key(seed)
    params = {"w": jax.random.normal(key, (3, 6, 5))}
    inv = np.argsort(perm)

    def fn(p, x):
        w = jnp.transpose(p["w"], perm)  # the model stores or views it permuted
        w = jnp.transpose(w, inv)[layer]  # ...and indexes one layer
        return x[:, 1:] @ w[1:, ::2] + (x @ w)[:, :1]

    x = jax.random.normal(jax.random.fold_in(key, 1), (4, 6))
    ad = jlora.init(key, params, jlora.LoraConfig(rank=2, targets=("w",)), fn, x)
    assert (ad["w"].stack_axes, ad["w"].in_axes, ad["w"].out_axes) == ((0,), (1,), (2,))
    ad = jax.tree.map(lambda v: jax.random.normal(key, v.shape) * 0.3, ad)
    assert jlora.explain(fn, params, ad, x)["w"] == ["factored", "factored"]
    check_against_materialized(fn, params, ad, x)


@st.composite
def adapted_leaves(draw):
    """A kernel with random stacked/in/out axes, dtype, rank and (maybe) a DoRA magnitude."""
    roles = draw(
        st.permutations(
            ["i"] * draw(st.integers(1, 2))
            + ["o"] * draw(st.integers(1, 2))
            + ["s"] * draw(st.integers(0, 2))
        )
    )
    shape = tuple(draw(st.integers(2, 5)) for _ in roles)
    axes = {k: tuple(ax for ax, r in enumerate(roles) if r == k) for k in "sio"}
    size = lambda k: int(np.prod([shape[ax] for ax in axes[k]]))
    rank = draw(st.integers(1, min(size("i"), size("o"))))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))  # numpy: drawing stays fast
    stack = tuple(shape[ax] for ax in axes["s"])
    normal = lambda i, s: jnp.asarray(rng.standard_normal(s), dtype)
    magnitude = None
    if draw(st.booleans()):  # DoRA: a positive magnitude per output feature
        magnitude = jnp.abs(normal(3, stack + (size("o"),))) + 0.5
    node = jlora.LoraNode(
        a=normal(0, stack + (size("i"), rank)) * 0.3,
        b=normal(1, stack + (rank, size("o"))) * 0.3,
        rank=rank,
        alpha=2.0 * rank,
        dropout=0.0,
        shape=shape,
        stack_axes=axes["s"],
        in_axes=axes["i"],
        out_axes=axes["o"],
        magnitude=magnitude,
    )
    return {"w": normal(2, shape)}, {"w": node}


def _ulps(dtype) -> float:
    """Tolerance relative to the largest value: 1e-5 in float32, 4 bfloat16 ulps."""
    return 1e-5 if dtype == jnp.float32 else 4 * 2.0**-8


@settings(max_examples=25, deadline=None, derandomize=True)
@given(adapted_leaves())
def test_merge_equals_the_materialized_weight_and_unmerge_inverts_it(case):
    params, adapter = case
    merged, norms = jlora.merge_with_norms(params, adapter)
    ref = ref_weight(params["w"], adapter["w"])  # float64
    tol = _ulps(params["w"].dtype) * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(np.asarray(merged["w"], np.float64), ref, rtol=0, atol=tol)
    back = jlora.unmerge(merged, adapter, norms)["w"]
    assert back.dtype == params["w"].dtype
    # the round trip rounds at the merged weight's magnitude and at the base's
    w = np.asarray(params["w"], np.float64)
    tol = _ulps(params["w"].dtype) * max(1.0, float(np.abs(ref).max()), float(np.abs(w).max()))
    np.testing.assert_allclose(np.asarray(back, np.float64), w, rtol=0, atol=tol)


HALF_GAP = float(np.max(np.diff(quant.NF4_CODE))) / 2
DYNAMIC_HALF_GAP = float(np.max(np.diff(quant.DYNAMIC_CODE))) / 2


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    st.lists(st.integers(1, 70), min_size=1, max_size=3),
    st.sampled_from([2, 16, 64, 128]),
    st.booleans(),
    st.sampled_from([1e-3, 1.0, 300.0]),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_nf4_round_trip_within_the_closed_form_bound(
    shape, block, double_quant, scale, heavy_tailed, seed
):
    """|dequantize(quantize(w)) - w| <= half the widest NF4 gap x absmax + the absmax error."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(2, shape) if heavy_tailed else rng.standard_normal(shape)) * scale
    w = w.astype(np.float32)
    node = quant.quantize_array(
        w, block_size=block, double_quant=double_quant, compute_dtype=jnp.float32
    )
    back = np.asarray(quant.dequantize_array(node), np.float64).reshape(-1)
    flat = w.reshape(-1).astype(np.float64)
    blocks = np.arange(flat.size) // block
    absmax = np.abs(np.pad(flat, (0, -flat.size % block))).reshape(-1, block).max(1)
    stored = np.asarray(node.absmax, np.float64)
    if double_quant:  # 8-bit dynamic codes of absmax - offset, one fp32 scale per 256 blocks
        outer = np.asarray(node.absmax2, np.float64)[np.arange(absmax.size) // quant.DQ_BLOCK]
        stored = quant.DYNAMIC_CODE[np.asarray(node.absmax)] * outer + float(node.offset)
        assert (np.abs(stored - absmax) <= DYNAMIC_HALF_GAP * outer + 1e-6 * absmax).all()
    else:
        np.testing.assert_allclose(stored, absmax, rtol=1e-7)
    err = np.abs(back - flat)
    bound = HALF_GAP * absmax + np.abs(stored - absmax) + 1e-6 * absmax
    assert (err <= bound[blocks]).all(), float((err - bound[blocks]).max())
