"""Quantized bases in every format (nf4, int8, int4, fp8, and the block-scaled mxfp4,
nvfp4, mxfp8, fp8_block) through one mechanism: sizes,
closed-form error bounds, LoRA on each base against LoRA on its dequantized copy, regions,
merge, checkpoints and bad input."""

import jax
import jax.numpy as jnp
import llama
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jlora
from conftest import F32, float_shapes, randomize
from jlora._src.numerics import formats, microscaled, quant, scaled
from jlora._src.numerics.quant import NF4_CODE

HALF_GAP = float(np.max(np.diff(NF4_CODE))) / 2  # worst NF4 rounding, relative to absmax

BLOCK_SCALED = ["mxfp4", "nvfp4", "mxfp8", "fp8_block"]
QTYPES = ["nf4", "int8", "int4", "fp8", *BLOCK_SCALED]
#: The formats with settings of their own (int4's group size: smaller than the test models')
LINEAR = ["int8", "int4", "fp8", *BLOCK_SCALED]
#: Bytes per parameter the issues ask for on a 256 x 512 weight (nf4: bitsandbytes' 4.127
#: bits; issue 43: 0.54 / 0.58 / 1.04 / 1.01 for the block-scaled formats).
MAX_BYTES = {"nf4": 0.52, "int8": 1.03, "int4": 0.56, "fp8": 1.03}
MAX_BYTES |= {"mxfp4": 0.54, "nvfp4": 0.58, "mxfp8": 1.04, "fp8_block": 1.01}


@pytest.mark.parametrize("qtype", QTYPES)
def test_bytes_per_parameter(qtype):
    w = jax.random.normal(jax.random.key(0), (256, 512))
    node = jlora.quantize({"w": w}, qtype=qtype)["w"]
    assert isinstance(node, jlora.Quantized) and node.qtype == qtype
    per = node.nbytes / node.size
    assert per <= MAX_BYTES[qtype], per
    stored = sum(a.nbytes for a in jax.tree.leaves(node))
    assert stored == node.nbytes


def _fp8_half_step(x):
    """Half the float8_e4m3fn spacing at |x| (normal: 3 mantissa bits; subnormal 2^-9)."""
    e = np.floor(np.log2(np.maximum(np.abs(x), 2.0**-6)))
    return 2.0 ** (e - 4)


def _bound(qtype, w, node):
    """The closed-form worst error of each element: half a quantization step."""
    if qtype == "nf4":
        return None
    g = node.group_size
    scales = np.repeat(np.asarray(node.scales), g, axis=-2)
    if qtype == "fp8":
        return scales * _fp8_half_step(np.asarray(w, np.float64) / np.where(scales > 0, scales, 1))
    return scales / 2


@settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    qtype=st.sampled_from(["nf4", "int8", "int4", "fp8"]),
    stack=st.sampled_from([(), (3,)]),
    groups=st.integers(1, 4),
    group=st.sampled_from([2, 8, 32]),
    cols=st.integers(1, 40),
    tail=st.sampled_from([1.0, 2.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_dequantization_error_within_half_a_step(qtype, stack, groups, group, cols, tail, seed):
    """Student-t weights (df = tail: heavy to light tails) of any shape and group size
    (NF4: block size)."""
    rng = np.random.default_rng(seed)
    rows = groups * group
    w = rng.standard_t(tail, stack + (rows, cols)).astype(np.float32)
    if qtype == "nf4":  # blocks of 2 * group consecutive elements; the bound at each absmax
        node = quant.quantize_array(
            jnp.asarray(w), block_size=2 * group, double_quant=False, compute_dtype=jnp.float32
        )
        flat, bs = w.reshape(-1), 2 * group
        absmax = np.repeat(np.asarray(node.absmax), bs)[: flat.size]
        err = np.abs(np.asarray(jlora.dequantize(node)).reshape(-1) - flat)
        assert (err <= HALF_GAP * absmax * (1 + 1e-6)).all()
        return
    node = scaled.quantize_array(
        jnp.asarray(w), qtype=qtype, group_size=group, compute_dtype=jnp.float32
    )
    back = np.asarray(jlora.dequantize(node), np.float64)
    err = np.abs(back - w)
    bound = _bound(qtype, w, node)
    assert (err <= bound * (1 + 1e-6) + 1e-30).all(), float((err - bound).max())
    # and the scales are the closed form: absmax of each group / qmax
    absmax = np.abs(w.reshape(stack + (groups, group, cols))).max(axis=-2)
    np.testing.assert_allclose(node.scales, absmax / scaled.QMAX[qtype], rtol=1e-6)


def _block_scaled_reference(qtype, w):
    """numpy and ml_dtypes, in float64: the block scales each format's definition gives
    (the module docstring of ``jlora._src.numerics.microscaled``), the codes as
    ml_dtypes rounds ``w / s`` (nearest, ties to even, saturating) and the element bound."""
    lay = microscaled.LAYOUTS[qtype]
    (r, c), (rows, cols) = lay.block, w.shape[-2:]
    largest = microscaled.LARGEST[lay.element]
    pad = [(0, 0)] * (w.ndim - 2) + [(0, -rows % r), (0, -cols % c)]
    blocks = np.pad(np.abs(w.astype(np.float64)), pad)
    blocks = blocks.reshape(w.shape[:-2] + (blocks.shape[-2] // r, r, blocks.shape[-1] // c, c))
    amax = blocks.max(axis=(-3, -1))
    if lay.scale == "e8m0":  # the smallest power of two that maps amax within range
        s = np.where(amax > 0, 2.0 ** np.ceil(np.log2(np.maximum(amax, 1e-300) / largest)), 1.0)
    elif lay.scale == "e4m3":
        top = amax.max(axis=(-2, -1), keepdims=True)
        tensor = np.where(top > 0, top / (448.0 * 6.0), 1.0).astype(np.float32)
        code = (amax.astype(np.float32) / np.float32(6.0) / tensor).astype(np.float32)
        s = code.astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * tensor
    else:
        s = amax.astype(np.float32) / np.float32(448.0)
    s = np.repeat(np.repeat(s, r, axis=-2), c, axis=-1)[..., :rows, :cols]
    y = np.where(s > 0, w / np.where(s > 0, s, 1.0), 0.0)
    fmt = ml_dtypes.float4_e2m1fn if lay.element == "e2m1" else ml_dtypes.float8_e4m3fn
    values = np.clip(y, -largest, largest).astype(fmt).astype(np.float64)
    a = np.abs(y)
    if lay.element == "e2m1":
        half = np.where(a < 2, 0.25, np.where(a < 4, 0.5, 1.0))
    else:
        half = _fp8_half_step(a)
    bound = s * np.where(a <= largest, half, a - largest)
    return s, values, bound


@settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    qtype=st.sampled_from(BLOCK_SCALED),
    stack=st.sampled_from([(), (2,)]),
    rows=st.integers(1, 300),
    cols=st.integers(1, 140),
    tail=st.sampled_from([1.0, 2.0, 30.0]),
    spread=st.sampled_from([1e-3, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_block_scaled_formats_are_their_closed_form(qtype, stack, rows, cols, tail, spread, seed):
    """Student-t weights times a per-row spread (blocks of very different magnitudes), any
    shape (partial blocks included): the dequantized weight is the closed-form scale times
    the element ml_dtypes rounds to, and within half an element step of the weight; a
    nonzero block whose scale would be zero is refused."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(tail, stack + (rows, cols)) * spread ** rng.uniform(-1, 1, (rows, 1))
    w = w.astype(np.float32)
    s, values, bound = _block_scaled_reference(qtype, w)
    if ((s == 0) & (w != 0)).any():  # nvfp4: a block far below the largest; E4M3 gives 0
        with pytest.raises(jlora.LoraError, match="'w' to nvfp4: a nonzero block's scale"):
            jlora.quantize({"w": w}, qtype=qtype)
        return
    node = jlora.quantize({"w": w}, qtype=qtype, compute_dtype=jnp.float32)["w"]
    back = np.asarray(jlora.dequantize(node), np.float64)
    np.testing.assert_allclose(back, (s * values).astype(np.float32), rtol=1e-6, atol=0)
    err = np.abs(back - w)  # (and float32 steps: s and s * element are rounded to float32)
    bound = bound * (1 + 1e-6) + np.abs(w) * 2.0**-22 + 1e-30
    assert (err <= bound).all(), float((err - bound).max())


def test_codes_are_the_closed_form():
    w = np.array([[1.0, -2.0], [0.5, 0.3], [-0.25, 2.0], [0.0, -1.0]], np.float32)
    i8 = jlora.quantize({"w": w}, qtype="int8")["w"]
    np.testing.assert_array_equal(i8.codes, np.round(w / (np.abs(w).max(0) / 127)))
    i4 = jlora.quantize({"w": w}, qtype="int4", group_size=2)["w"]
    want = np.round(w / np.repeat(np.abs(w.reshape(2, 2, 2)).max(1) / 7, 2, axis=0))
    nib = want.astype(np.int64) + 8
    np.testing.assert_array_equal(i4.codes, (nib[0::2] << 4) | nib[1::2])
    f8 = jlora.quantize({"w": w}, qtype="fp8")["w"]
    want8 = (w / (np.abs(w).max(0) / 448)).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(f8.codes), want8.view(np.uint8))


@pytest.mark.parametrize("on_mesh", [False, True])
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize(
    "region",
    [
        (None, (3, 64, 128)),
        (64 * 128, (64, 128)),
        (64 * 128 + 16 * 128, (32, 128)),
        (64 * 128, (2, 64, 128)),
        (2 * 64 * 128 + 5 * 128 + 32, (64,)),
    ],
)
def test_a_region_equals_the_same_cut_of_the_whole(qtype, region, on_mesh):
    """What the interpreter narrows a stacked weight to, with the start traced under jit;
    ``on_mesh``: quantized split over a one-device mesh, so the codes take the layout a
    sharded weight's do (NF4: the weight's leading axes), checked against the flat one."""
    start, shape = region
    w = jax.random.normal(jax.random.key(1), (3, 64, 128))
    flat = jlora.quantize({"w": w}, qtype=qtype, compute_dtype=jnp.float32)["w"]
    node = flat
    if on_mesh:
        one = jax.make_mesh((1,), ("model",))
        split = jax.device_put(
            w, jax.sharding.NamedSharding(one, jax.sharding.PartitionSpec(None, None, "model"))
        )
        node = jlora.quantize({"w": split}, qtype=qtype, compute_dtype=jnp.float32)["w"]
        if qtype == "nf4":
            assert node.packed.shape == (3, 64, 64) and flat.packed.ndim == 1
    whole = np.asarray(jlora.dequantize(flat)).reshape(-1)
    lo = 0 if start is None else start
    want = whole[lo : lo + int(np.prod(shape))].reshape(shape)
    got = jax.jit(lambda s: formats.dequantize_region(node, s, shape))(lo)
    # 1e-6: under jit XLA may fuse nf4's double-quantized scale (code * scale + offset)
    # into one multiply-add, which rounds once where the eager ops round twice
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    if start is None:
        np.testing.assert_array_equal(formats.dequantize_region(node, None, shape), want)


def _model(key, **kw):
    cfg = llama.LlamaConfig(**kw)
    ids = jax.random.randint(key, (2, 16), 0, cfg.vocab_size)
    return llama.Llama(cfg), llama.init_params(cfg, key), ids


@pytest.mark.parametrize(
    "qtype, scan",
    [(q, scan) for q in ("int8", "int4", "fp8") for scan in (True, False)]
    + [(q, scan) for q in BLOCK_SCALED for scan in (True, "remat")],
)
def test_lora_on_each_base_equals_lora_on_its_dequantized_copy(key, qtype, scan):
    """Scanned layers, unrolled ones, and scanned under ``jax.checkpoint`` (remat). The
    block-scaled formats run scanned and remat; the whole-matrix regions an unrolled model
    reads are checked for every format in ``test_a_region_equals_the_same_cut_of_the_whole``."""
    model, params, ids = _model(key, scan_layers=bool(scan), remat=scan == "remat")
    q = jlora.quantize(
        params, qtype=qtype, group_size=16 if qtype == "int4" else None, compute_dtype=jnp.float32
    )
    deq = jlora.dequantize(q)
    ad = randomize(jlora.init(key, q, jlora.LoraConfig.preset("general"), model.apply, ids), key)
    f = jax.jit(jlora.apply(model.apply))
    np.testing.assert_allclose(f(q, ad, ids), f(deq, ad, ids), **F32)
    grads = lambda p: jax.jit(jax.grad(lambda a: f(p, a, ids).sum()))(ad)
    for g1, g2 in zip(jax.tree.leaves(grads(q)), jax.tree.leaves(grads(deq))):
        np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5)
    assert set(sum(jlora.explain(model.apply, q, ad, ids).values(), [])) == {"factored"}
    assert jlora.check(q, ad) == jlora.check(deq, ad)


@pytest.mark.parametrize("qtype", LINEAR)
def test_scanned_step_dequantizes_one_layer_at_a_time(key, qtype):
    # 4 layers: with 3, one layer's MLP kernel padded to whole 128 x 128 blocks (fp8_block
    # dequantizes through 128 x 384) holds as many elements as the stacked 3 x 128 x 128
    model, params, ids = _model(key, num_layers=4)
    q = jlora.quantize(params, qtype=qtype, group_size=32 if qtype == "int4" else None)
    ad = randomize(jlora.init(key, q, jlora.LoraConfig.preset("complex")), key)
    step = jax.grad(
        lambda a: llama.loss_fn(jlora.apply(model.apply)(q, a, ids[:, :-1]), ids[:, 1:])
    )
    shapes = list(float_shapes(jax.make_jaxpr(step)(ad).jaxpr))
    stacked = [
        x.shape
        for x in jax.tree.leaves(q, is_leaf=jlora._src.qnode.is_quantized)
        if jlora._src.qnode.is_quantized(x)
    ]
    padded = lambda t: (*t[:-2], *(-(-n // 128) * 128 for n in t[-2:]))  # whole blocks
    whole = {np.prod(t) for t in stacked} | {np.prod(padded(t)) for t in stacked}
    assert not [s for s, _ in shapes if np.prod(s) in whole]
    layer = {s[1:] for s in stacked}
    assert {s for s, loop in shapes if s in layer and loop} == layer


@pytest.mark.parametrize("qtype", LINEAR)
def test_merge_requantize_and_checkpoint(key, qtype, tmp_path):
    model, params, ids = _model(key)
    q = jlora.quantize(
        params, qtype=qtype, compute_dtype=jnp.float32, group_size=32 if qtype == "int4" else None
    )
    ad = randomize(jlora.init(key, q, jlora.LoraConfig(rank=4, targets=("q_proj",))), key)
    merged = jlora.merge(q, ad)
    np.testing.assert_allclose(
        model.apply(merged, ids), jlora.apply(model.apply)(q, ad, ids), rtol=1e-4, atol=1e-4
    )
    with pytest.warns(UserWarning, match=f"rounds base \\+ adapter to {qtype.upper()}"):
        requant = jlora.merge(q, ad, requantize=True)
    path = ("params", "layers", "self_attn", "q_proj", "kernel")
    got, want = requant, merged
    for k in path:
        got, want = got[k], want[k]
    settings_of = formats.of(got).settings  # the options that made the node (group size)
    assert got.qtype == qtype
    assert settings_of(got) == settings_of(q["params"]["layers"]["self_attn"]["q_proj"]["kernel"])
    again = jlora.quantize({"w": want}, qtype=qtype, compute_dtype=jnp.float32, **settings_of(got))[
        "w"
    ]
    np.testing.assert_array_equal(jlora.dequantize(got), jlora.dequantize(again))
    jlora.save_checkpoint(tmp_path, 1, {"base": q})
    back, _ = jlora.restore_checkpoint(tmp_path, {"base": q})
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(q)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_bad_input_is_refused_by_name_and_nothing_is_modified():
    w = {"layer": {"kernel": jnp.ones((96, 8)), "ids": jnp.ones((4, 8), jnp.int32)}}
    before = jax.tree.map(np.array, w)
    cases = [
        (dict(qtype="int3"), "qtype='int3' is not a format"),
        (dict(qtype="int4", group_size=40), "group_size=40 does not divide .*96.*layer/kernel"),
        (dict(qtype="int8", block_size=32), "do not apply to qtype='int8'"),
        (dict(qtype="nf4", group_size=32), "do not apply to qtype='nf4'"),
        (dict(qtype="int8", targets="ids"), "layer/ids.*not a floating point"),
    ]
    for kw, match in cases:
        with pytest.raises(jlora.LoraError, match=match):
            jlora.quantize(w, **kw)
    bad = {"k": jnp.ones((4, 8)).at[1, 2].set(jnp.inf)}
    for qtype in QTYPES:
        with pytest.raises(jlora.LoraError, match="'k'.*inf or nan"):
            jlora.quantize(bad, qtype=qtype)
    tiny = {"k": jnp.full((4, 8), 1e-37)}  # a nonzero group whose scale underflows
    with pytest.raises(jlora.LoraError, match="'k'.*underflows to zero"):
        jlora.quantize(tiny, qtype="int8")
    zero = jlora.quantize({"k": jnp.zeros((4, 8))}, qtype="int8")["k"]  # exact, no error
    np.testing.assert_array_equal(jlora.dequantize(zero), 0.0)
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


def test_nf4_codebook_unchanged_by_the_mechanism():
    """The registry routes nf4 to bitsandbytes' format: one code per element, exact."""
    codes = np.arange(64) % 16
    w = (NF4_CODE[codes] * 3.0).reshape(4, 16)
    node = jlora.quantize({"w": w}, double_quant=False, compute_dtype=jnp.float32)["w"]
    np.testing.assert_array_equal(jlora.dequantize(node), w)


def test_each_format_keeps_the_step_temporaries_of_int8():
    """XLA's ``memory_analysis`` of a scanned QLoRA step: no format keeps more temporaries
    than int8 (fp8 once did: XLA's CPU backend widened the whole stacked float8 codes to
    f16 before the loop; the codes are now stored as bits and widened per layer)."""
    cfg = llama.LlamaConfig(
        vocab_size=500,
        hidden_size=256,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
    )
    model = llama.Llama(cfg)
    params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((2, 33), jnp.int32)
    temps = {}
    for qtype in QTYPES:
        q = jax.eval_shape(lambda p: jlora.quantize(p, qtype=qtype), params)
        ad = jax.eval_shape(
            lambda p: jlora.init(
                jax.random.key(0), p, jlora.LoraConfig(rank=8, targets=("q_proj",))
            ),
            q,
        )
        step = jax.grad(
            lambda a, p, x: llama.loss_fn(
                jlora.apply(model.apply)(p, a, x[:, :-1]).astype(jnp.float32), x[:, 1:]
            )
        )
        temps[qtype] = (
            jax.jit(step).lower(ad, q, ids).compile().memory_analysis().temp_size_in_bytes
        )
    # the E2M1 formats unpack two values a byte and keep 3.9% more here (8.71 MB against
    # int8's 8.38 MB when measured; a whole stack widened, the fault this test is for,
    # is +27% or more)
    assert all(temps[q] <= (1.05 if "fp4" in q else 1.01) * temps["int8"] for q in temps), temps
