"""DoRA against its closed form (PEFT's formulas), factored and merged."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_apply import Attn, Mlp, Scanned, X

import jlora
from conftest import BF16, F32, check_against_materialized, close, ref_merge


def _dora(adapter, key):
    """Random a, b and a magnitude near its init (B = 0 at init tests nothing)."""

    def one(n):
        k = jax.random.fold_in(key, n.a.size)
        noise = lambda i, x: (0.1 * jax.random.normal(jax.random.fold_in(k, i), x.shape)).astype(
            x.dtype
        )
        return dataclasses.replace(
            n,
            a=n.a + noise(0, n.a),
            b=noise(1, n.b),
            magnitude=n.magnitude * (1 + noise(2, n.magnitude)),
        )

    return jax.tree.map(one, adapter, is_leaf=jlora._src.adapter.is_node)


def _setup(model, targets, key, fn=False, **kw):
    params = model.init(key, X)
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=targets, dora=True, **kw)
    extra = (model.apply, X) if fn else ()
    return params, _dora(jlora.init(key, params, cfg, *extra), key)


@pytest.mark.parametrize("rslora", [False, True])
def test_dora_matches_closed_form_outputs_and_gradients(key, rslora):
    params, ad = _setup(Mlp(), ("up_proj", "down_proj"), key, rslora=rslora)
    assert ad["params"]["up_proj"]["kernel"].magnitude.shape == (32,)
    check_against_materialized(Mlp().apply, params, ad, X)


def test_dora_in_scan_and_dense_general(key):
    params, ad = _setup(Scanned(), ("q_proj", "v_proj"), key)
    assert ad["params"]["layers"]["q_proj"]["kernel"].magnitude.shape == (3, 16)
    assert set(sum(jlora.explain(Scanned().apply, params, ad, X).values(), [])) == {"factored"}
    check_against_materialized(Scanned().apply, params, ad, X)
    params, ad = _setup(Attn(), ("q_proj", "o_proj"), key, fn=True)
    check_against_materialized(Attn().apply, params, ad, X)


def test_dora_bf16_base(key):
    model = Mlp(dtype=jnp.bfloat16)
    params, ad = _setup(model, ("up_proj",), key, dtype=jnp.float32)
    check_against_materialized(model.apply, params, ad, X.astype(jnp.bfloat16), tol=BF16)


def test_dora_is_the_identity_at_init(key):
    params = Scanned().init(key, X)
    ad = jlora.init(key, params, jlora.LoraConfig(targets=("q_proj", "v_proj"), dora=True))
    close(
        jlora.apply(Scanned().apply)(params, ad, X),
        Scanned().apply(params, X),
        dict(rtol=1e-6, atol=1e-6),
    )


def test_dora_dropout_follows_peft(key):
    """y = x W0 + (g - 1)(drop(x) W0) + g s (drop(x) A) B, with g = m / ||W0 + s A B||."""
    d, rate = 8, 0.5
    w = jax.random.normal(key, (d, d))
    params = {"w": w}
    cfg = jlora.LoraConfig(rank=2, alpha=2.0, targets=("w",), dora=True, dropout=rate)
    node = jlora.init(key, params, cfg)["w"]
    node = dataclasses.replace(node, magnitude=node.magnitude * 1.5)  # g = 1.5 when B = 0
    x = jax.random.normal(jax.random.fold_in(key, 1), (64, d))
    f = jlora.apply(lambda p, x: x @ p["w"])
    rng = jax.random.key(5)
    x_drop = (f(params, {"w": node}, x, lora_rng=rng) - x @ w) / 0.5  # B = 0: (g-1) drop(x) W0
    x_drop = np.linalg.solve(np.asarray(w).T, np.asarray(x_drop).T).T
    kept = np.abs(x_drop) > 1e-3
    np.testing.assert_allclose(x_drop[kept], np.asarray(x / (1 - rate))[kept], rtol=1e-3)
    node = dataclasses.replace(node, b=0.3 * jax.random.normal(key, node.b.shape))
    w_, a, b, x_ = (np.asarray(v, np.float64) for v in (w, node.a, node.b, x))
    g = np.asarray(node.magnitude) / np.linalg.norm(w_ + node.scale * a @ b, axis=0)
    ref = x_ @ w_ + (g - 1) * (x_drop @ w_) + g * (node.scale * (x_drop @ a) @ b)
    close(f(params, {"w": node}, x, lora_rng=rng), ref, dict(rtol=1e-4, atol=1e-4))


def test_dora_merge_and_unmerge(key):
    params, ad = _setup(Scanned(), ("q_proj",), key)
    merged, norms = jlora.merge_with_norms(params, ad)
    close(merged, ref_merge(params, ad))
    close(Scanned().apply(merged, X), jlora.apply(Scanned().apply)(params, ad, X))
    close(jlora.unmerge(merged, ad, norms), params, dict(rtol=1e-5, atol=1e-5))
    with pytest.raises(jlora.LoraError, match="merge_with_norms"):
        jlora.unmerge(merged, ad)


def test_the_old_pair_returning_calls_still_work_with_a_deprecation_warning(key):
    """merge(return_norms=True) and init(init="pissa") return pairs for one more release."""
    params, ad = _setup(Scanned(), ("q_proj",), key)
    with pytest.warns(DeprecationWarning, match="merge_with_norms"):
        merged, norms = jlora.merge(params, ad, return_norms=True)
    new = jlora.merge_with_norms(params, ad)
    close(merged, new.params)
    close(norms, new.norms)
    cfg = jlora.LoraConfig(rank=2, targets=("q_proj",), init="pissa")
    with pytest.warns(DeprecationWarning, match="init_with_base"):
        old_ad, old_base = jlora.init(key, params, cfg)
    result = jlora.init_with_base(key, params, cfg)
    close((old_ad, old_base), (result.adapter, result.base))
    assert jlora.init_with_base(key, params, jlora.LoraConfig(rank=2)).base is params


def test_dora_magnitude_trains_with_b_in_loraplus_and_saves(key, tmp_path):
    params, ad = _setup(Scanned(), ("q_proj",), key)
    labels = jlora._src.optim.labels(ad)["params"]["layers"]["q_proj"]["kernel"]
    assert (labels.a, labels.b, labels.magnitude) == ("a", "b", "b")
    jlora.save_adapter(tmp_path / "dora", ad)
    back = jlora.load_adapter(tmp_path / "dora", params)
    np.testing.assert_array_equal(
        back["params"]["layers"]["q_proj"]["kernel"].magnitude,
        ad["params"]["layers"]["q_proj"]["kernel"].magnitude,
    )
    close(
        jlora.apply(Scanned().apply)(params, back, X),
        jlora.apply(Scanned().apply)(params, ad, X),
        F32,
    )
