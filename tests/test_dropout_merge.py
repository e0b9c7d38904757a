"""Dropout semantics, merge/unmerge, init schemes (closed-form references)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_apply import Scanned, X

import jlora
from conftest import F32, close, randomize, ref_merge

D, N, RATE = 32, 4096, 0.25


def _identity_adapter(params, key, rate=RATE, targets=("w1", "w2"), fn=()):
    """A = B = I and scale 1, so the LoRA path returns dropout(x) itself."""
    cfg = jlora.LoraConfig(rank=D, alpha=float(D), targets=targets, dropout=rate)
    ad = jlora.init(key, params, cfg, *fn)
    eye = lambda n: dataclasses.replace(
        n, a=jnp.broadcast_to(jnp.eye(D), n.a.shape), b=jnp.broadcast_to(jnp.eye(D), n.b.shape)
    )
    return jax.tree.map(eye, ad, is_leaf=jlora._src.adapter.is_node)


def _two_sites(p, x):
    return x @ p["w1"], x @ p["w2"]


def test_dropout_statistics_and_base_path_untouched(key):
    params = {"w1": jax.random.normal(key, (D, D)), "w2": jnp.zeros((D, D))}
    ad = _identity_adapter(params, key)
    x = jax.random.normal(jax.random.key(1), (N, D)) + 3.0
    y1, _ = jax.jit(jlora.apply(_two_sites))(params, ad, x, lora_rng=jax.random.key(2))
    lora = np.asarray(y1 - x @ params["w1"])  # only the LoRA input is dropped
    kept = np.abs(lora) > 1e-3
    np.testing.assert_allclose(lora[kept], np.asarray(x / (1 - RATE))[kept], rtol=1e-4)
    frac = 1 - kept.mean()
    assert abs(frac - RATE) < 4 * np.sqrt(RATE * (1 - RATE) / kept.size), frac


def test_dropout_masks_differ_per_site_and_per_scan_step(key):
    params = {"w1": jnp.zeros((D, D)), "w2": jnp.zeros((D, D))}
    ad = _identity_adapter(params, key)
    x = jnp.ones((N, D))
    y1, y2 = jlora.apply(_two_sites)(params, ad, x, lora_rng=key)
    corr = lambda u, v: np.corrcoef(np.ravel(u != 0), np.ravel(v != 0))[0, 1]
    assert abs(corr(y1, y2)) < 0.05

    stacked = {"w1": jnp.zeros((2, D, D))}
    per_layer = lambda p, x: jax.lax.scan(lambda c, w: (c, x @ w), 0.0, p["w1"])[1]
    ad = _identity_adapter(stacked, key, targets=("w1",), fn=(per_layer, x))
    ys = jax.jit(jlora.apply(per_layer))(stacked, ad, x, lora_rng=key)
    assert abs(corr(ys[0], ys[1])) < 0.05
    assert not np.array_equal(ys[0] != 0, ys[1] != 0)


def test_deterministic_means_no_dropout_and_no_rng_without_it_is_refused(key):
    """As Flax's and Equinox's dropout: no key and no deterministic=True is an error (it
    used to run without dropout silently); deterministic=True runs without dropout."""
    params = {"w1": jnp.zeros((D, D)), "w2": jnp.zeros((D, D))}
    ad = _identity_adapter(params, key, rate=0.5)
    x = jnp.ones((8, D))
    np.testing.assert_array_equal(jlora.apply(_two_sites)(params, ad, x, deterministic=True)[0], x)
    with pytest.raises(jlora.LoraError, match="'w1' has dropout=0.5 but no lora_rng"):
        jlora.apply(_two_sites)(params, ad, x)


def test_merge_matches_reference_and_merged_forward_matches_unmerged(key):
    params = Scanned().init(key, X)
    ad = randomize(jlora.init(key, params, jlora.LoraConfig(targets=("q_proj", "v_proj"))), key)
    merged = jlora.merge(params, ad)
    close(merged, ref_merge(params, ad))
    close(Scanned().apply(merged, X), jlora.apply(Scanned().apply)(params, ad, X))
    close(jlora.unmerge(merged, ad), params, dict(rtol=1e-5, atol=1e-6))


def test_merge_refuses_non_finite(key):
    params = {"q_proj": {"kernel": jnp.ones((8, 8))}}
    ad = jlora.init(key, params, jlora.LoraConfig(rank=2, targets=("q_proj",)))
    bad = jax.tree.map(lambda v: v.at[0, 0].set(jnp.nan), ad)
    with pytest.raises(jlora.LoraError, match="q_proj/kernel.*non-finite"):
        jlora.merge(params, bad)


def test_rslora_scaling_in_the_forward(key):
    w = {"q_proj": jnp.zeros((16, 16))}
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj",), rslora=True)
    ad = randomize(jlora.init(key, w, cfg), key)
    n = ad["q_proj"]
    y = jlora.apply(lambda p, x: x @ p["q_proj"])(w, ad, X)
    close(y, 8.0 / 2.0 * (X @ n.a) @ n.b, F32)  # alpha / sqrt(r), not alpha / r


def test_kaiming_and_gaussian_init(key):
    w = {"q_proj": jnp.zeros((256, 64))}
    ad = jlora.init(key, w, jlora.LoraConfig(rank=16, targets=("q_proj",)))["q_proj"]
    assert float(jnp.abs(ad.a).max()) <= 1 / 16.0 and float(jnp.abs(ad.a).max()) > 0.9 / 16
    assert not ad.b.any()
    ad = jlora.init(key, w, jlora.LoraConfig(rank=16, targets=("q_proj",), init="gaussian"))[
        "q_proj"
    ]
    assert abs(float(ad.a.std()) - 1 / 16) < 0.005 and not ad.b.any()


def test_pissa_moves_top_singular_directions_into_the_adapter(key):
    w = {"q_proj": {"kernel": jax.random.normal(key, (3, 24, 16))}}
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj",), init="pissa")
    f = lambda p, x: x @ p["q_proj"]["kernel"][1]
    x = jax.random.normal(key, (5, 24))
    ad, residual = jlora.init_with_base(key, w, cfg, f, x)  # f indexes a layer: axis 0 is stacked
    n = ad["q_proj"]["kernel"]
    u, s, vh = np.linalg.svd(np.asarray(w["q_proj"]["kernel"], np.float64))
    best = (u[..., :4] * s[..., None, :4]) @ vh[..., :4, :]  # Eckart-Young rank-4
    close(n.scale * np.asarray(n.a @ n.b), best, F32)
    close(jlora.merge(residual, ad), w, F32)
    close(jlora.apply(f)(residual, ad, x), f(w, x), F32)  # the model is unchanged at init


def test_olora_takes_the_first_r_qr_directions_per_layer(key):
    """OLoRA on a stacked kernel: per layer, torch layout W^T = Q R, a = R[:r]^T, b = Q[:, :r]^T
    (numpy's QR in float64 as the reference), and the model is unchanged at init."""
    w = {"q_proj": {"kernel": jax.random.normal(key, (3, 24, 16))}}
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj",), init="olora")
    f = lambda p, x: x @ p["q_proj"]["kernel"][1]
    x = jax.random.normal(key, (5, 24))
    ad, residual = jlora.init_with_base(key, w, cfg, f, x)
    n = ad["q_proj"]["kernel"]
    for layer in range(3):
        q, r = np.linalg.qr(np.asarray(w["q_proj"]["kernel"][layer], np.float64).T)
        close(np.asarray(n.a[layer]), r[:4].T, F32)
        close(np.asarray(n.b[layer]), q[:, :4].T, F32)
    close(jlora.merge(residual, ad), w, F32)
    close(jlora.apply(f)(residual, ad, x), f(w, x), F32)
