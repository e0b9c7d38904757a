"""The adapter checkpoint's format: derived from the node dataclasses' fields, and files
written in the first format (``jlora-adapter/1``, by jlora before the node model stored
``rslora``) still load to the same nodes."""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._src.adapter import KINDS, arrays, from_settings, settings
from jlora._src.targets import path_str

DATA = os.path.join(os.path.dirname(__file__), "data")


def _fn(p, x):
    def body(h, w):
        return jnp.tanh(h @ w["q_proj"][:, :4]), None

    h, _ = jax.lax.scan(body, x, p["layers"])
    h = h + p["embed"][jnp.array([1, 2])].sum(0)[None]
    return (h @ p["o_proj"]) @ p["head"]


def _params():
    return {
        "layers": {"q_proj": jnp.ones((3, 4, 6))},
        "o_proj": jnp.ones((4, 5)),
        "embed": jnp.ones((10, 4)),
        "head": jnp.ones((5, 3)),
    }


def _every_kind():
    """An adapter with each savable node kind: LoRA (rsLoRA, rank 1), DoRA on some layers
    of a stack, a leaf trained in full and token rows."""
    params, x = _params(), jnp.ones((2, 4))
    cfg = jlora.LoraConfig(
        rank=2,
        alpha=3.0,
        targets=("q_proj",),
        rslora=True,
        dora=True,
        layers_to_transform=(0, 2),
        modules_to_save=("head",),
        trainable_token_indices={"embed": (1, 3)},
    )
    ad = jlora.init(jax.random.key(0), params, cfg, _fn, x)
    one = jlora.LoraConfig(rank=1, alpha=3.0, targets=("o_proj",), rslora=True)
    ad["o_proj"] = jlora.init(jax.random.key(1), params, one, _fn, x)["o_proj"]
    return params, jax.tree.map(lambda v: v + 0.25, ad)


def test_settings_and_arrays_rebuild_every_node_kind():
    _, ad = _every_kind()
    nodes = jlora._src.adapter.adapter_nodes(ad)
    assert {n.kind for n in nodes.values()} == {"lora", "layers", "full", "tokens"}
    for path, node in nodes.items():
        back = from_settings(settings(node), arrays(node))
        assert type(back) is type(node) and KINDS[node.kind] is type(node), path
        assert jax.tree.structure(back) == jax.tree.structure(node), path
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(node), strict=True):
            assert x is y, path


def test_save_and_load_keep_every_setting(tmp_path):
    params, ad = _every_kind()
    jlora.save_adapter(tmp_path / "ad", ad)
    back = jlora.load_adapter(tmp_path / "ad", params)
    assert jax.tree.structure(back) == jax.tree.structure(ad)  # the static settings too
    o = back["o_proj"]
    assert o.rslora and o.rank == 1 and o.scale == 3.0  # alpha / sqrt(1): rsLoRA kept
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(ad), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_first_format_checkpoint_loads_to_the_same_nodes():
    """``tests/data/adapter_v1`` was written by ``save_adapter`` at commit 9f8b629 (format
    ``jlora-adapter/1``: scale and a variant name stored, a layers node flat), from the
    adapter whose arrays ``adapter_v1.npz`` holds: rsLoRA rank 3 alpha 4 on ``o_proj``,
    rsLoRA+DoRA rank 2 alpha 3 on layers 0 and 2 of a 3-layer stack, token rows, a full
    leaf."""
    params = _params()
    back = jlora.load_adapter(os.path.join(DATA, "adapter_v1"), params)
    want = dict(np.load(os.path.join(DATA, "adapter_v1.npz")))
    got = {path_str(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(back)[0]}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    o, q = back["o_proj"], back["layers"]["q_proj"]
    assert (o.rank, o.alpha, o.rslora, o.magnitude) == (3, 4.0, True, None)
    assert o.scale == pytest.approx(4.0 / math.sqrt(3), rel=1e-12)
    assert (q.kind, q.layers, q.length, q.node.rslora, q.node.axes_from) == (
        "layers",
        (0, 2),
        3,
        True,
        "fn",
    )
    assert q.node.scale == pytest.approx(3.0 / math.sqrt(2), rel=1e-12)
    assert back["embed"].indices == (1, 3) and back["head"].weight.shape == (5, 3)
    # what the old version computed with it (printed when the file was written)
    y = jlora.apply(_fn)(params, back, jnp.ones((2, 4)))
    np.testing.assert_allclose(y, np.full((2, 3), 90.57213), rtol=1e-5)


def test_a_first_format_node_whose_scale_is_not_derivable_is_refused(tmp_path):
    """A ``/1`` node whose stored scale is neither alpha/rank nor alpha/sqrt(rank) would load
    with another scale: refused by name rather than computed wrong."""
    import json
    import shutil

    copy = tmp_path / "adapter_v1"
    shutil.copytree(os.path.join(DATA, "adapter_v1"), copy)
    meta = copy / "0" / "meta" / "metadata"
    saved = json.loads(meta.read_text())
    saved["nodes"]["o_proj"]["scale"] = 0.7
    meta.write_text(json.dumps(saved))
    with pytest.raises(jlora.LoraError, match="'o_proj' was saved with scale 0.7"):
        jlora.load_adapter(copy, _params())


def test_a_stacked_adapter_gives_back_each_member_whole():
    params = {"q": jnp.ones((4, 6))}
    cfgs = [
        jlora.LoraConfig(rank=1, alpha=2.0, targets=("q",), rslora=True),
        jlora.LoraConfig(rank=3, alpha=5.0, targets=("q",), alora_invocation_tokens=(7,)),
    ]
    ads = [jlora.init(jax.random.key(i), params, c) for i, c in enumerate(cfgs)]
    stacked = jlora.stack(ads)["q"]
    assert stacked.ranks == (1, 3) and stacked.alphas == (2.0, 5.0)
    assert stacked.scale == (2.0, 5.0 / 3) and stacked.invocations == (None, (7,))
    for i, ad in enumerate(ads):
        one = stacked.member(i)
        assert dataclasses.replace(one, a=None, b=None) == dataclasses.replace(
            ad["q"], a=None, b=None
        )
        np.testing.assert_array_equal(one.a, ad["q"].a)
        np.testing.assert_array_equal(one.b, ad["q"].b)
