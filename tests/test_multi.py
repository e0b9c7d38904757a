"""Many adapters over one base: switching, mixed-adapter batches, adapter arithmetic."""

import jax
import jax.numpy as jnp
import llama
import numpy as np
import pytest

import jlora
from conftest import F32, float_shapes, randomize, scanned

TARGETS = ("q_proj", "v_proj", "up_proj")
# (rank, alpha, rslora): different ranks and scalings share one stack
SETTINGS = [(2, 4.0, False), (8, 16.0, True), (4, 3.0, False)]


def _setup(key, scan=True, dora=False, quantized=False, batch=5):
    cfg = llama.LlamaConfig(scan_layers=scan)
    model = llama.Llama(cfg)
    ids = jax.random.randint(key, (batch, 12), 0, cfg.vocab_size)
    params = llama.init_params(cfg, key)
    if quantized:
        params = jlora.quantize(params, compute_dtype=jnp.float32)
    ads = [
        randomize(
            jlora.init(
                jax.random.fold_in(key, i),
                params,
                jlora.LoraConfig(rank=r, alpha=a, rslora=rs, dora=dora, targets=TARGETS),
            ),
            jax.random.fold_in(key, 9 + i),
        )
        for i, (r, a, rs) in enumerate(SETTINGS)
    ]
    return model, params, ids, ads


@pytest.mark.parametrize(
    "scan,dora,quantized",
    [(True, False, False), (False, False, False), (True, True, False), (True, False, True)],
)
def test_mixed_batch_equals_each_adapter_alone(key, scan, dora, quantized):
    model, params, ids, ads = _setup(key, scan, dora, quantized)
    aid = jnp.array([2, 0, -1, 1, 0])
    f = jax.jit(jlora.apply(model.apply))
    mixed = f(params, jlora.stack(ads), ids, adapter_ids=aid)
    base = params if not quantized else jlora.dequantize(params)
    for i, a in enumerate(aid.tolist()):
        alone = (
            llama.Llama(model.config).apply(base, ids[i : i + 1])
            if a < 0
            else jlora.apply(model.apply)(params, ads[a], ids[i : i + 1])
        )
        np.testing.assert_allclose(mixed[i], alone[0], **F32)


@pytest.mark.parametrize("dora", [False, True])
def test_one_scaling_for_all_and_no_copy_of_the_stack_per_call(key, dora):
    """Adapters of one rank and alpha keep their scaling on the thin intermediate, and a
    scanned model slices each layer's factors in its step: no equation produces an array
    of a stacked factor's size (measured: a transposed, rescaled copy of every stack per
    call cost a mixed decode step of 64 adapters ~20%, ``benchmarks/serve.py``)."""
    cfg = llama.LlamaConfig(scan_layers=True)
    model, params = llama.Llama(cfg), llama.init_params(cfg, key)
    ids = jax.random.randint(key, (3, 5), 0, cfg.vocab_size)
    ads = [
        randomize(
            jlora.init(
                jax.random.fold_in(key, i),
                params,
                jlora.LoraConfig(rank=4, alpha=8.0, dora=dora, targets=TARGETS),
            ),
            jax.random.fold_in(key, 9 + i),
        )
        for i in range(3)
    ]
    stacked, aid = jlora.stack(ads), jnp.array([1, -1, 0])
    f = jlora.apply(model.apply)
    mixed = jax.jit(f)(params, stacked, ids, adapter_ids=aid)
    for i, a in enumerate(aid.tolist()):
        alone = model.apply(params, ids[i : i + 1]) if a < 0 else f(params, ads[a], ids[i : i + 1])
        np.testing.assert_allclose(mixed[i], alone[0], **F32)
    if dora:  # DoRA's norms read every adapter's whole weight anyway
        return
    jaxpr = jax.make_jaxpr(lambda st: f(params, st, ids, adapter_ids=aid))(stacked).jaxpr
    stacks = {tuple(sorted(leaf.shape)) for leaf in jax.tree.leaves(stacked)}  # any order
    assert not stacks & {tuple(sorted(s)) for s, _ in float_shapes(jaxpr)}, stacks


def test_padding_to_the_largest_rank_is_exact(key):
    _, params, _, ads = _setup(key)
    st = jlora.stack(ads)
    node = st["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert node.a.shape[-1] == 8 and node.ranks == (2, 8, 4)
    for i, ad in enumerate(ads):
        one = ad["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
        # exact: the adapter's own factors, then zeros, so A B is the adapter's product
        # in exact arithmetic (a float32 matmul's rounding depends on its inner length:
        # XLA's CPU kernels for inner length 2 and 8 differ in the last bit, so the
        # products are compared to float32 rounding, the factors bit for bit)
        r = one.rank
        np.testing.assert_array_equal(node.a[i][..., :r], one.a)
        np.testing.assert_array_equal(node.b[i][..., :r, :], one.b)
        assert not np.any(node.a[i][..., r:]) and not np.any(node.b[i][..., r:, :])
        np.testing.assert_allclose(node.a[i] @ node.b[i], one.a @ one.b, rtol=1e-6, atol=1e-7)
        assert float(node.scale[i]) == pytest.approx(one.scale)


def test_flattened_batch_axis_and_errors(key):
    p = {"q_proj": jax.random.normal(key, (6, 4))}
    ads = [
        randomize(
            jlora.init(
                jax.random.fold_in(key, i), p, jlora.LoraConfig(rank=2, targets=("q_proj",))
            ),
            jax.random.fold_in(key, i),
        )
        for i in range(2)
    ]
    st = jlora.stack(ads)
    x = jax.random.normal(key, (3, 5, 6))
    flat = jlora.apply(lambda p, x: (x.reshape(-1, 6) @ p["q_proj"]).reshape(3, 5, 4))
    ids = jnp.array([1, -1, 0])
    want = jnp.stack(
        [
            jlora.apply(lambda p, x: x @ p["q_proj"])(p, ads[1], x[0]),
            x[1] @ p["q_proj"],
            jlora.apply(lambda p, x: x @ p["q_proj"])(p, ads[0], x[2]),
        ]
    )
    np.testing.assert_allclose(flat(p, st, x, adapter_ids=ids), want, **F32)
    # a model that moves the examples to axis 1 is followed, not guessed at
    seq_first = jlora.apply(lambda p, x: jnp.swapaxes(x, 0, 1) @ p["q_proj"])
    np.testing.assert_allclose(
        seq_first(p, st, x, adapter_ids=ids), jnp.swapaxes(want, 0, 1), **F32
    )
    interleaved = jlora.apply(lambda p, x: jnp.swapaxes(x, 0, 1).reshape(-1, 6) @ p["q_proj"])
    with pytest.raises(ValueError, match="example axis was lost.*reshape"):
        interleaved(p, st, x, adapter_ids=ids)
    with pytest.raises(ValueError, match=r"out of range: the stack holds 2 adapters"):
        flat(p, st, x, adapter_ids=jnp.array([0, 2, -1]))
    with pytest.raises(ValueError, match="needs adapter_ids"):
        flat(p, st, x)
    with pytest.raises(ValueError, match="needs a stacked adapter"):
        flat(p, ads[0], x, adapter_ids=ids)
    with pytest.raises(ValueError, match="1-D integer"):
        flat(p, st, x, adapter_ids=jnp.array([0.0, 1.0, 0.0]))
    scaled = jlora.apply(lambda p, x: x @ (2 * p["q_proj"]))  # a scalar scale stays factored
    np.testing.assert_allclose(scaled(p, st, x, adapter_ids=ids), 2 * want, **F32)
    per_out = jlora.apply(lambda p, x: x @ (p["q_proj"] * jnp.arange(4.0)[None]))
    np.testing.assert_allclose(
        per_out(p, st, x, adapter_ids=ids),  # the scale folds into B
        want * jnp.arange(4.0)[None, None],
        **F32,
    )
    with pytest.raises(ValueError, match="needs 'q_proj' to be used by dot_general"):
        jlora.apply(lambda p, x: x @ (p["q_proj"] * jnp.arange(24.0).reshape(6, 4)))(
            p, st, x, adapter_ids=ids
        )
    other = jlora.init(key, {"k": jnp.ones((6, 4)), **p}, jlora.LoraConfig(rank=2, targets=("k",)))
    with pytest.raises(ValueError, match="adapt different leaves"):
        jlora.stack([ads[0], other])
    with pytest.raises(ValueError, match="only rank and alpha may differ"):
        jlora.stack(
            [ads[0], jlora.init(key, p, jlora.LoraConfig(rank=2, targets=("q_proj",), dropout=0.1))]
        )


def test_switching_adapters_does_not_retrace(key):
    model, params, ids, ads = _setup(key)
    traces = []

    @jax.jit
    def f(ad, x):
        traces.append(1)
        return jlora.apply(model.apply)(params, ad, x)

    loaded = [jax.tree.map(lambda v: v * 1.0, ad) for ad in ads]  # new arrays, same shapes
    same_rank = [a for a, s in zip(loaded, SETTINGS) if s == SETTINGS[0]] + [
        randomize(ads[0], jax.random.fold_in(key, k)) for k in range(3)
    ]
    for ad in same_rank:
        f(ad, ids).block_until_ready()
    assert len(traces) == 1
    g = jax.jit(lambda st, x, i: jlora.apply(model.apply)(params, st, x, adapter_ids=i))
    st = jlora.stack(ads)
    for i in ([0, 1, 2, -1, 0], [2, 2, 2, 2, 2], [-1, 0, 1, 0, 1]):
        g(st, ids, jnp.array(i)).block_until_ready()
    assert g._cache_size() == 1


def _delta(node):
    """``s * A @ B`` in float64 numpy, ``(*stack, in, out)``."""
    return node.scale * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)


def _sources(key):
    """Three adapters of one base: alpha != r (scaling applied twice would show) and an
    rsLoRA source (alpha / sqrt(r), which PEFT once over-scaled by sqrt(r))."""
    params = {"layers": {"q_proj": jax.random.normal(key, (3, 24, 16))}}
    cfgs = [
        jlora.LoraConfig(rank=2, alpha=7.0, targets=("q_proj",)),
        jlora.LoraConfig(rank=4, alpha=3.0, rslora=True, targets=("q_proj",)),
        jlora.LoraConfig(rank=3, alpha=3.0, targets=("q_proj",)),
    ]
    fn = scanned(("layers", "q_proj"))
    ads = [
        randomize(
            jlora.init(jax.random.fold_in(key, i), params, c, fn),
            jax.random.fold_in(key, 5 + i),
            scale=0.5,
        )
        for i, c in enumerate(cfgs)
    ]
    return params, ads


def _node(ad):
    return ad["layers"]["q_proj"]


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_cat_and_linear_are_the_exact_weighted_sum(key, method):
    params, ads = _sources(key)
    weights = [0.7, -1.3, 2.0]
    out = jlora.combine_adapters(ads, weights, method=method)
    want = sum(w * _delta(_node(a)) for w, a in zip(weights, ads))
    node = _node(out)
    assert node.rank == 9 and node.scale == 1.0 and node.alpha == 9.0
    np.testing.assert_allclose(_delta(node), want, rtol=1e-5, atol=1e-6)
    merged = jlora.merge(params, out)["layers"]["q_proj"]
    np.testing.assert_allclose(merged, np.asarray(params["layers"]["q_proj"]) + want, **F32)
    if method == "cat":  # the sources' A's are kept as they were
        np.testing.assert_array_equal(node.a[..., :2], _node(ads[0]).a)


def test_svd_is_the_best_rank_k_approximation(key):
    _, ads = _sources(key)
    weights = [0.7, -1.3, 2.0]
    want = sum(w * _delta(_node(a)) for w, a in zip(weights, ads))
    for k in (2, 4):
        node = _node(jlora.combine_adapters(ads, weights, method="svd", rank=k))
        u, s, vh = np.linalg.svd(want, full_matrices=False)
        best = (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]
        assert node.a.shape == (3, 24, k) and node.scale == 1.0
        np.testing.assert_allclose(_delta(node), best, rtol=1e-4, atol=1e-5)
    full = _node(jlora.combine_adapters(ads, weights, method="svd", rank=9))
    np.testing.assert_allclose(_delta(full), want, rtol=1e-4, atol=1e-5)  # rank 9 is exact


def test_combine_errors(key):
    _, ads = _sources(key)
    with pytest.raises(ValueError, match="one weight per adapter"):
        jlora.combine_adapters(ads, [1.0])
    with pytest.raises(ValueError, match="method='mean' is not one of"):
        jlora.combine_adapters(ads, [1.0] * 3, method="mean")
    p = {"q_proj": jnp.ones((4, 4))}
    dora = jlora.init(key, p, jlora.LoraConfig(rank=1, targets=("q_proj",), dora=True))
    with pytest.raises(ValueError, match="a DoRA magnitude.*does not add"):
        jlora.combine_adapters([dora, dora], [1.0, 1.0])
