"""NF4 format (against the closed-form codebook and bitsandbytes) and QLoRA through apply."""

import jax
import jax.extend
import jax.numpy as jnp
import llama
import numpy as np
import optax
import pytest
from scipy.stats import norm

import jlora
from conftest import F32, float_shapes, randomize
from jlora._src.numerics import quant
from jlora._src.numerics.quant import NF4_CODE

HALF_GAP = float(np.max(np.diff(NF4_CODE))) / 2  # worst NF4 rounding, relative to absmax


def test_codebook_is_bitsandbytes_normal_map():
    """create_normal_map(offset=0.9677083, use_extra_value=True), computed here with scipy."""
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([pos, [0.0], neg]))
    # bitsandbytes computed these in float32: equal to the float64 values within 2e-7
    np.testing.assert_allclose(NF4_CODE, values / values.max(), rtol=0, atol=2e-7)
    assert NF4_CODE.dtype == np.float32 and len(NF4_CODE) == 16


def test_dynamic_map_shape():
    code = quant.DYNAMIC_CODE
    assert code.shape == (256,) and code.dtype == np.float32 and (np.diff(code) >= 0).all()
    assert code.max() == 1.0 and code.min() > -1.0 and 0.0 in code


def test_packing_order_and_nearest_code_with_ties_to_lower():
    codes = np.arange(64) % 16  # element i holds code value i % 16
    node = quant.quantize_array((NF4_CODE[codes] * 3.0).reshape(4, 16), double_quant=False)
    packed = np.asarray(node.packed)
    assert packed.dtype == np.uint8 and packed.shape == (32,)
    assert packed[1] == (2 << 4) | 3  # even element in the high nibble
    np.testing.assert_array_equal(packed >> 4, codes[0::2])
    np.testing.assert_array_equal(packed & 15, codes[1::2])
    np.testing.assert_allclose(np.asarray(node.absmax), [3.0])
    # bitsandbytes buckets against the float32 midpoints; a value on one goes to the lower code
    ties = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    np.testing.assert_array_equal(
        np.asarray(quant._bucket(jnp.asarray(ties), NF4_CODE)), np.arange(15)
    )


def _nearest(s):
    """Closed-form nearest code, ties to the lower: the first index of the minimum."""
    return np.argmin(np.abs(np.float32(s) - NF4_CODE))


@pytest.mark.parametrize("shape", [(64, 48), (7, 33), (3, 5), (2, 3, 128)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_within_the_nf4_bound_per_block(shape, double_quant):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.05
    node = quant.quantize_array(w, double_quant=double_quant, compute_dtype=jnp.float32)
    back = np.asarray(quant.dequantize_array(node)).reshape(-1)
    flat = w.reshape(-1)
    pad = -len(flat) % 64
    absmax = np.abs(np.pad(flat, (0, pad))).reshape(-1, 64).max(1).repeat(64)[: len(flat)]
    codes = np.array([_nearest(s) for s in flat / absmax])
    if not double_quant:  # exact: nearest code times the block's absmax
        np.testing.assert_array_equal(back, NF4_CODE[codes] * absmax.astype(np.float32))
    stored = absmax if not double_quant else _dq_absmax(node)[np.arange(len(flat)) // 64]
    assert (np.abs(stored - absmax) <= 0.01 * absmax + 1e-7).all()  # 8-bit level: < 1%
    assert (np.abs(back - flat) <= HALF_GAP * absmax + np.abs(stored - absmax) + 1e-7).all()


def _dq_absmax(node):
    codes = np.asarray(node.absmax)
    outer = np.asarray(node.absmax2)[np.arange(len(codes)) // quant.DQ_BLOCK]
    return quant.DYNAMIC_CODE[codes] * outer + np.asarray(node.offset)


def test_double_quant_levels():
    w = np.random.default_rng(1).standard_normal((64, 64 * 300)).astype(np.float32)
    node = quant.quantize_array(w)
    absmax = np.abs(w.reshape(-1, 64)).max(1)
    assert node.absmax.dtype == jnp.uint8 and node.absmax.shape == absmax.shape
    assert node.absmax2.shape == (-(-len(absmax) // 256),)
    np.testing.assert_allclose(float(node.offset), absmax.mean(), rtol=1e-6)
    centred = (absmax - absmax.mean()).reshape(-1)
    pad = -len(centred) % 256
    scale = np.abs(np.pad(centred, (0, pad))).reshape(-1, 256).max(1)
    np.testing.assert_array_equal(np.asarray(node.absmax2), scale)
    s = centred / scale.repeat(256)[: len(centred)]
    nearest = np.argmin(np.abs(s[:, None] - quant.DYNAMIC_CODE[None]), axis=1)
    np.testing.assert_array_equal(
        quant.DYNAMIC_CODE[np.asarray(node.absmax)], quant.DYNAMIC_CODE[nearest]
    )


@pytest.mark.parametrize("double_quant,bits", [(True, 4.127), (False, 4.5)])
def test_stored_bytes_match_bits_per_parameter(double_quant, bits):
    n = 1024 * 1024
    node = quant.quantize_array(jnp.ones((1024, 1024)), double_quant=double_quant)
    expected = n / 2 + (n / 64 + 4 * n / 64 / 256 + 4 if double_quant else 4 * n / 64)
    assert node.nbytes == expected
    assert abs(8 * node.nbytes / n - bits) < 1e-3


def test_quantize_tree_defaults_and_errors(key):
    params = llama.init_params(llama.LlamaConfig(), key)
    q = jlora.quantize(params)
    kinds = {
        p: type(l).__name__
        for p, l in zip(
            jlora._src.targets.leaf_paths(q), jax.tree.leaves(q, is_leaf=jlora._src.nf4.is_nf4)
        )
    }
    assert kinds["params/layers/self_attn/q_proj/kernel"] == "NF4"
    assert kinds["params/embed_tokens/embedding"] == "ArrayImpl"
    assert kinds["params/lm_head/kernel"] == "ArrayImpl"
    assert kinds["params/layers/input_layernorm/weight"] == "ArrayImpl"
    assert jax.tree.leaves(params)[0].dtype == jnp.float32  # input untouched
    with pytest.raises(ValueError, match="matched no parameter; paths look like"):
        jlora.quantize(params, targets="nope")
    with pytest.raises(ValueError, match="not a floating point weight"):
        jlora.quantize({"ids": jnp.ones((4, 64), jnp.int32)}, targets="ids")


# ----- QLoRA through apply ---------------------------------------------------------------


def _model(key, **kw):
    cfg = llama.LlamaConfig(**kw)
    model = llama.Llama(cfg)
    ids = jax.random.randint(key, (2, 16), 0, cfg.vocab_size)
    return model, llama.init_params(cfg, key), ids


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("scan", [True, False])
def test_qlora_equals_lora_on_the_dequantized_base(key, dora, scan):
    model, params, ids = _model(key, scan_layers=scan)
    q = jlora.quantize(params, compute_dtype=jnp.float32)
    deq = jlora.dequantize(q)
    cfg = jlora.LoraConfig.preset("general", dora=dora)
    ad = randomize(jlora.init(key, q, cfg, model.apply, ids), key)
    f = jax.jit(jlora.apply(model.apply))
    np.testing.assert_allclose(f(q, ad, ids), f(deq, ad, ids), **F32)
    loss = lambda p: jax.grad(lambda a: f(p, a, ids).sum())(ad)
    for g1, g2 in zip(jax.tree.leaves(loss(q)), jax.tree.leaves(loss(deq))):
        np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5)
    assert set(sum(jlora.explain(model.apply, q, ad, ids).values(), [])) == {"factored"}


@pytest.mark.parametrize("dora", [False, True])
def test_scanned_qlora_step_dequantizes_one_layer_at_a_time(key, dora):
    """No float value of a whole stacked kernel's size exists anywhere in the training
    step (forward, backward, DoRA norms), and single layers are dequantized in the loop."""
    model, params, ids = _model(key, num_layers=3)
    q = jlora.quantize(params)
    ad = randomize(jlora.init(key, q, jlora.LoraConfig.preset("complex", dora=dora)), key)
    step = jax.grad(
        lambda a: llama.loss_fn(jlora.apply(model.apply)(q, a, ids[:, :-1]), ids[:, 1:])
    )
    shapes = list(float_shapes(jax.make_jaxpr(step)(ad).jaxpr))
    stacked = [
        l.shape
        for l in jax.tree.leaves(q, is_leaf=jlora._src.nf4.is_nf4)
        if jlora._src.nf4.is_nf4(l)
    ]
    sizes = {np.prod(s) for s in stacked}
    assert not [s for s, _ in shapes if np.prod(s) in sizes]
    layer = {s[1:] for s in stacked}
    assert {s for s, loop in shapes if s in layer and loop} == layer


def test_merge_on_an_nf4_base(key):
    model, params, ids = _model(key)
    q = jlora.quantize(params, compute_dtype=jnp.float32)
    ad = randomize(jlora.init(key, q, jlora.LoraConfig.preset("general")), key)
    merged = jlora.merge(q, ad)
    assert not any(
        jlora._src.nf4.is_nf4(l) for l in jax.tree.leaves(merged, is_leaf=jlora._src.nf4.is_nf4)
    )
    expected = jlora.merge(jlora.dequantize(q), ad)
    for m, e in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
        np.testing.assert_allclose(m, e, **F32)
    np.testing.assert_allclose(
        model.apply(merged, ids), jlora.apply(model.apply)(q, ad, ids), rtol=1e-4, atol=1e-4
    )
    with pytest.warns(UserWarning, match="rounds base \\+ adapter to NF4"):
        requant = jlora.merge(q, ad, requantize=True)
    path = ("params", "layers", "self_attn", "q_proj", "kernel")
    get = lambda t: t[path[0]][path[1]][path[2]][path[3]][path[4]]
    assert jlora._src.nf4.is_nf4(get(requant)) and get(requant).block_size == get(q).block_size
    np.testing.assert_allclose(
        jlora.dequantize(get(requant)),
        jlora.dequantize(quant.quantize_array(get(expected), compute_dtype=jnp.float32)),
        **F32,
    )
    up = ("params", "layers", "mlp", "up_proj", "kernel")  # not adapted: kept as it was
    assert get_path(requant, up) is get_path(q, up)


def get_path(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_untargeted_nf4_leaves_and_init_on_a_quantized_base(key):
    model, params, ids = _model(key, scan_layers=False)
    q = jlora.quantize(params, compute_dtype=jnp.float32)
    ad = randomize(
        jlora.init(key, q, jlora.LoraConfig(rank=4, targets=("q_proj",)), model.apply, ids), key
    )
    want = jlora.apply(model.apply)(jlora.dequantize(q), ad, ids)
    np.testing.assert_allclose(jax.jit(jlora.apply(model.apply))(q, ad, ids), want, **F32)
    np.testing.assert_allclose(model.apply(jlora.merge(q, ad), ids), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="already quantized.*quantize the residual"):
        jlora.init_with_base(key, q, jlora.LoraConfig(rank=4, targets=("q_proj",), init="pissa"))


def test_bfloat16_compute_matches_the_dequantized_bfloat16_base(key):
    model, params, ids = _model(key, dtype=jnp.bfloat16)
    q = jlora.quantize(params)  # compute dtype bf16
    ad = randomize(jlora.init(key, q, jlora.LoraConfig.preset("quick")), key)
    f = jax.jit(jlora.apply(model.apply))
    np.testing.assert_array_equal(f(q, ad, ids), f(jlora.dequantize(q), ad, ids))


def test_zero_blocks_quantize_to_the_zero_code():
    w = jnp.zeros((2, 64)).at[1, 3].set(0.5)
    node = quant.quantize_array(w, compute_dtype=jnp.float32)
    assert (np.asarray(node.packed)[:32] == (7 << 4) | 7).all()  # code 7 is 0.0
    np.testing.assert_array_equal(quant.dequantize_array(node)[0], 0.0)
    np.testing.assert_allclose(quant.dequantize_array(node)[1, 3], 0.5, rtol=1e-2)


def test_qlora_training_lowers_the_loss_like_the_bf16_run(key):
    """Same adapter init, data and optimizer; the base in bf16 vs NF4 (bf16 compute)."""
    import quickstart

    cfg = llama.LlamaConfig(vocab_size=16, dtype=jnp.bfloat16)
    model = llama.Llama(cfg)
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), llama.init_params(cfg, key))
    ad0 = jlora.init(
        jax.random.fold_in(key, 1), base, jlora.LoraConfig.preset("general", dtype=jnp.float32)
    )
    tx = optax.adamw(3e-3)

    def train(params, steps=60):
        loss = lambda ad, ids, mask: llama.loss_fn(
            jlora.apply(model.apply)(params, ad, ids[:, :-1]).astype(jnp.float32), ids[:, 1:], mask
        )

        @jax.jit
        def step(ad, opt, k):
            value, g = jax.value_and_grad(loss)(ad, *quickstart.batch(k))
            u, opt = tx.update(g, opt, ad)
            return optax.apply_updates(ad, u), opt, value

        ad, opt, losses = ad0, tx.init(ad0), []
        for i in range(steps):
            ad, opt, value = step(ad, opt, jax.random.fold_in(key, i))
            losses.append(float(value))
        return np.mean(losses[:5]), np.mean(losses[-5:])

    (b0, b1), (q0, q1) = train(base), train(jlora.quantize(base))
    assert abs(q0 - b0) < 0.05 * b0  # same starting point (the quantized base is close)
    assert b1 < 0.7 * b0 and q1 < 0.7 * q0  # both learn
    assert abs(q1 - b1) < 0.15 * b1, (b0, b1, q0, q1)  # and about equally well


def test_loftq_corrects_the_quantization_error(key):
    """LoftQ: an NF4 base and factors such that dequant(Q) + s A B is closer to W than
    dequant(NF4(W)) (Frobenius), closer still with more iterations; apply runs on it like
    on the merged weight, and DoRA's magnitude starts at the corrected weight's norm."""
    w = {"q": jax.random.normal(key, (2, 64, 48)) * jnp.linspace(0.2, 3.0, 48)[None, None]}
    fn = lambda p, x: jax.lax.scan(lambda c, layer: (c, x @ layer), 0.0, p["q"])[1]
    x = jax.random.normal(key, (3, 64))
    plain = jlora.dequantize(jlora.quantize(w, targets=("q",), compute_dtype=jnp.float32))
    errors = [float(jnp.linalg.norm(w["q"] - plain["q"]))]
    for iters in (1, 5):
        cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets=("q",), init="loftq", loftq_iter=iters)
        adapter, qbase = jlora.init_with_base(key, w, cfg, fn, x)
        assert isinstance(qbase["q"], jlora.NF4) and adapter["q"].a.shape == (2, 64, 8)
        merged = jlora.merge(qbase, adapter)
        errors.append(float(jnp.linalg.norm(w["q"] - merged["q"])))
        np.testing.assert_allclose(
            jlora.apply(fn)(qbase, adapter, x), fn(merged, x), rtol=1e-4, atol=1e-4
        )
    assert errors[2] < errors[1] < 0.8 * errors[0]  # measured: 0.73 and 0.65 of plain NF4
    dora = jlora.LoraConfig(rank=8, alpha=16.0, targets=("q",), init="loftq", dora=True)
    adapter, qbase = jlora.init_with_base(key, w, dora, fn, x)
    np.testing.assert_allclose(
        jlora.apply(fn)(qbase, adapter, x), fn(jlora.merge(qbase, adapter), x), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(jlora.LoraError, match="loftq_iter"):
        jlora.LoraConfig(init="loftq", loftq_iter=0)
    with pytest.raises(jlora.LoraError, match="already quantized"):
        jlora.init_with_base(key, jlora.quantize(w, targets=("q",)), cfg, fn, x)
