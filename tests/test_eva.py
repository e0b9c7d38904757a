"""EVA: A from the principal directions of each target's inputs, ranks by explained variance,
checked against numpy's SVD of the same rows and PEFT's redistribution rule."""

import jax
import jax.numpy as jnp
import llama
import numpy as np
import pytest

import jlora
from conftest import F32


def _rows(key, n, spectrum):
    """``n`` rows whose covariance has the given per-direction standard deviations."""
    k1, k2 = jax.random.split(key)
    q = np.linalg.qr(np.asarray(jax.random.normal(k1, (len(spectrum),) * 2)))[0]
    z = np.asarray(jax.random.normal(k2, (n, len(spectrum)))) * np.asarray(spectrum)
    return (z @ q.T + 0.5).astype(np.float32)  # a mean, which PCA removes


def _pca(x):
    """Principal directions (columns, sklearn's sign) and explained-variance ratios."""
    xc = x.astype(np.float64) - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    vt = vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]
    return vt.T, s**2 / (s**2).sum(), s


def _two_layer(key):
    p = {"q": jax.random.normal(key, (8, 6)), "u": jax.random.normal(key, (6, 5))}
    fn = lambda p, x, z: (jnp.tanh(x @ p["q"]), z @ p["u"])
    return p, fn


def test_components_and_ranks_match_the_closed_form(key):
    p, fn = _two_layer(key)
    x = _rows(key, 300, [5.0, 4.5, 4.0, 0.3, 0.2, 0.1, 0.1, 0.05])  # three strong directions
    z = _rows(jax.random.fold_in(key, 1), 300, [1.0] * 6)  # no preferred direction
    batches = [(x[:120], z[:120]), (x[120:], z[120:])]  # statistics add up across batches
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=("q", "u"))
    ad = jlora.init_eva(key, p, cfg, fn, batches, rho=2.0, whiten=True)
    ins = {"q": x, "u": z}
    pcas = {k: _pca(v) for k, v in ins.items()}
    # PEFT's rule: the 4 largest ratios among each leaf's first round(2 * 2) = 4 win
    pool = sorted([(r, k) for k, (_, ratios, _) in pcas.items() for r in ratios[:4]], reverse=True)[
        :4
    ]
    want = {k: sum(1 for _, kk in pool if kk == k) for k in ins}
    assert want["q"] == 3  # the input with three strong directions takes a third
    for k, node in ad.items():
        if want[k] == 0:
            assert node is None
            continue
        comps, _, s = pcas[k]
        assert node.rank == want[k] and node.alpha == pytest.approx(4.0 * want[k] / 2)
        assert node.scale == pytest.approx(2.0)  # alpha/r kept by adjust_scaling
        np.testing.assert_allclose(
            node.a, comps[:, : want[k]] / np.sqrt(s[: want[k]]), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_array_equal(node.b, 0)
    for got, want in zip(jlora.apply(fn)(p, ad, x, z), fn(p, x, z)):
        np.testing.assert_allclose(got, want, **F32)


def test_mask_drops_rows_and_scanned_layers_match_unscanned(key):
    """A scanned (and rematerialized) stack gets each layer's own PCA: the same factors
    as the unscanned model's leaf per layer; masked rows count for nothing."""
    ids = jax.random.randint(key, (4, 16), 0, 256)
    mask = np.arange(16)[None, :] < np.array([[16], [9], [12], [5]])
    batches, masks = [(ids[:2],), (ids[2:],)], [mask[:2], mask[2:]]
    cfg = jlora.LoraConfig(rank=4, targets=("q_proj", "down_proj"))
    conf = llama.LlamaConfig(scan_layers=True, remat=True)
    stacked = llama.init_params(conf, key)
    layers = {
        f"layers_{i}": jax.tree.map(lambda v, i=i: v[i], stacked["params"]["layers"])
        for i in range(conf.num_layers)
    }
    unstacked = {
        "params": {**{k: v for k, v in stacked["params"].items() if k != "layers"}, **layers}
    }
    got = {}
    for scan, params in ((True, stacked), (False, unstacked)):
        model = llama.Llama(llama.LlamaConfig(scan_layers=scan, remat=scan))
        got[scan] = jlora.init_eva(key, params, cfg, model.apply, batches, masks=masks, rho=1.0)
    for i in range(2):
        for name, mod in (("q_proj", "self_attn"), ("down_proj", "mlp")):
            one = got[False]["params"][f"layers_{i}"][mod][name]["kernel"]
            stacked = got[True]["params"]["layers"][mod][name]["kernel"]
            np.testing.assert_allclose(stacked.a[i], one.a, rtol=1e-4, atol=1e-4)
    # layer 0's q_proj input is the embedding after RMSNorm: check it against numpy on
    # the kept rows only
    p0 = unstacked["params"]
    emb = np.asarray(p0["embed_tokens"]["embedding"])[np.asarray(ids)]
    h = emb / np.sqrt((emb**2).mean(-1, keepdims=True) + conf.rms_norm_eps)
    h = h * np.asarray(p0["layers_0"]["input_layernorm"]["weight"])
    comps = _pca(h[mask])[0]
    np.testing.assert_allclose(
        got[False]["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"].a,
        comps[:, :4],
        rtol=1e-3,
        atol=1e-3,
    )


def test_errors(key):
    p, fn = _two_layer(key)
    x = (_rows(key, 40, [1.0] * 8), _rows(key, 40, [1.0] * 6))
    cfg = jlora.LoraConfig(rank=2, targets=("q", "u"))
    with pytest.raises(ValueError, match="rho must be >= 1"):
        jlora.init_eva(key, p, cfg, fn, [x], rho=0.5)
    with pytest.raises(ValueError, match="non-empty list"):
        jlora.init_eva(key, p, cfg, fn, [])
    with pytest.raises(ValueError, match="fewer than the"):
        jlora.init_eva(key, p, cfg, fn, [(x[0][:3], x[1][:3])])
    with pytest.raises(ValueError, match="EVA mask has shape"):
        jlora.init_eva(key, p, cfg, fn, [x], masks=[np.ones((3,), bool)])
    with pytest.raises(ValueError, match="change the base"):
        jlora.init_eva(key, p, jlora.LoraConfig(rank=2, targets=("q",), init="pissa"), fn, [x])
    # a stacked leaf whose layers would get different ranks
    w = jnp.stack([jnp.eye(8), jnp.eye(8)])
    scan = lambda p, x: jax.lax.scan(
        lambda c, w: (c @ w * jnp.array([[9.0] + [1.0] * 7]), None), x, p["w"]
    )[0]
    with pytest.raises(ValueError, match="layers_to_transform on a scanned stack"):
        jlora.init_eva(
            key,
            {"layers": {"w": w, "v": w}},
            jlora.LoraConfig(rank=2, targets=("w",), layers_to_transform=[1]),
            lambda p, x: scan({"w": p["layers"]["w"]}, x),
            [(_rows(key, 50, [1.0] * 8),)],
        )
    with pytest.raises(ValueError, match="different ranks.*rho=1.0"):
        jlora.init_eva(
            key,
            {"w": w},
            jlora.LoraConfig(rank=2, targets=("w",)),
            scan,
            [(_rows(key, 50, [1.0] * 8),)],
            rho=2.0,
        )
