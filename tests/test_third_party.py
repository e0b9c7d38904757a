"""jlora on modules it did not write: Equinox (through ``eqx.partition``/``eqx.combine``)
and Haiku. Every use of every target is factored per ``explain``, and outputs and
gradients equal the merged reference (fp32 1e-5, jitted)."""

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import pytest

import jlora
from conftest import check_against_materialized, randomize

K = jax.random.split(jax.random.key(11), 4)


def _equinox(module):
    """Params and ``fn(params, x)`` that vmaps the module over a batch."""
    params, static = eqx.partition(module, eqx.is_inexact_array)
    return params, lambda p, x: jax.vmap(eqx.combine(p, static))(x)


def _mha(p, x, static):
    return eqx.combine(p, static)(x, x, x)


def _haiku(f, x):
    t = hk.without_apply_rng(hk.transform(f))
    return t.init(jax.random.key(0), x), t.apply


def _layer_stack(x):
    return hk.experimental.layer_stack(3)(lambda x: jax.nn.relu(hk.Linear(8)(x)))(x)


def _cases():
    mha_params, mha_static = eqx.partition(eqx.nn.MultiheadAttention(2, 8, key=K[0]),
                                           eqx.is_inexact_array)
    x8, img = jax.random.normal(K[1], (5, 8)), jax.random.normal(K[2], (2, 3, 8, 8))
    ids = jnp.arange(6).reshape(2, 3)
    return {
        "eqx.nn.MLP": (*_equinox(eqx.nn.MLP(8, 4, 16, 2, key=K[0])), r"layers/\d+/weight", x8),
        "eqx.nn.Conv2d": (*_equinox(eqx.nn.Conv2d(3, 6, 3, key=K[0])), "weight", img),
        "eqx.nn.Embedding": (*_equinox(eqx.nn.Embedding(20, 8, key=K[0])), "weight",
                             jnp.arange(5)),
        "eqx.nn.MultiheadAttention": (mha_params, lambda p, x: _mha(p, x, mha_static),
                                      r"(query|key|value|output)_proj/weight", x8[:4]),
        "hk.nets.MLP": (*_haiku(lambda x: hk.nets.MLP([16, 4])(x), x8), r"linear_\d+/w", x8),
        "hk.Conv2D": (*_haiku(lambda x: hk.Conv2D(6, 3)(x), img.transpose(0, 2, 3, 1)),
                      "conv2_d/w", img.transpose(0, 2, 3, 1)),
        "hk.Embed": (*_haiku(lambda i: hk.Embed(20, 8)(i), ids), "embed/embeddings", ids),
        "hk.MultiHeadAttention": (*_haiku(lambda x: hk.MultiHeadAttention(
            2, 4, w_init=hk.initializers.VarianceScaling(1.0))(x, x, x), x8[None]),
            r"(query|key|value|linear)/w", x8[None]),
        "hk.layer_stack": (*_haiku(_layer_stack, x8), "linear/w", x8),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_every_use_is_factored_and_exact(key, name):
    params, fn, targets, x = _cases()[name]
    cfg = jlora.LoraConfig(rank=2, targets=targets)
    adapter = randomize(jlora.init(key, params, cfg, fn, x), key)
    uses = jlora.explain(fn, params, adapter, x)
    assert uses and all(u == ["factored"] for u in uses.values()), uses
    check_against_materialized(fn, params, adapter, x)
