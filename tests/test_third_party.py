"""jlora on modules it did not write: Equinox (through ``eqx.partition``/``eqx.combine``),
Haiku, Flax Linen and Flax NNX (through ``nnx.split``/``nnx.merge``). Every use of every
target is factored per ``explain``, outputs and gradients equal the merged reference
(fp32 1e-5, jitted), and a second adapter runs without retracing."""

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

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


def _nnx(module):
    """NNX through ``nnx.split``: the params a pure dict, ``fn`` merges them back."""
    graphdef, state = nnx.split(module)

    def fn(p, x):
        st = jax.tree.map(lambda v: v, state)  # a copy to fill; the caller's stays
        nnx.replace_by_pure_dict(st, p)
        return nnx.merge(graphdef, st)(x)

    return nnx.to_pure_dict(state), fn


def _linen(module, x):
    return module.init(K[3], x), module.apply


def _flax_cases():
    x8, img = jax.random.normal(K[1], (2, 5, 8)), jax.random.normal(K[2], (2, 8, 8, 3))
    ids, qkvo = jnp.arange(6).reshape(2, 3), r"(query|key|value|out)/kernel"
    return {
        "nnx.Conv": (*_nnx(nnx.Conv(3, 6, (3, 3), rngs=nnx.Rngs(0))), "kernel", img),
        "nnx.Embed": (*_nnx(nnx.Embed(20, 8, rngs=nnx.Rngs(0))), "embedding", ids),
        "nnx.MultiHeadAttention": (
            *_nnx(nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0))),
            qkvo,
            x8,
        ),
        "nn.Conv": (*_linen(nn.Conv(6, (3, 3)), img), "kernel", img),
        "nn.Embed": (*_linen(nn.Embed(20, 8), ids), "embedding", ids),
        "nn.MultiHeadDotProductAttention": (
            *_linen(nn.MultiHeadDotProductAttention(2), x8),
            qkvo,
            x8,
        ),
    }


def _cases():
    mha_params, mha_static = eqx.partition(
        eqx.nn.MultiheadAttention(2, 8, key=K[0]), eqx.is_inexact_array
    )
    x8, img = jax.random.normal(K[1], (5, 8)), jax.random.normal(K[2], (2, 3, 8, 8))
    ids = jnp.arange(6).reshape(2, 3)
    return {
        "eqx.nn.MLP": (*_equinox(eqx.nn.MLP(8, 4, 16, 2, key=K[0])), r"layers/\d+/weight", x8),
        "eqx.nn.Conv2d": (*_equinox(eqx.nn.Conv2d(3, 6, 3, key=K[0])), "weight", img),
        "eqx.nn.Embedding": (*_equinox(eqx.nn.Embedding(20, 8, key=K[0])), "weight", jnp.arange(5)),
        "eqx.nn.MultiheadAttention": (
            mha_params,
            lambda p, x: _mha(p, x, mha_static),
            r"(query|key|value|output)_proj/weight",
            x8[:4],
        ),
        "hk.nets.MLP": (*_haiku(lambda x: hk.nets.MLP([16, 4])(x), x8), r"linear_\d+/w", x8),
        "hk.Conv2D": (
            *_haiku(lambda x: hk.Conv2D(6, 3)(x), img.transpose(0, 2, 3, 1)),
            "conv2_d/w",
            img.transpose(0, 2, 3, 1),
        ),
        "hk.Embed": (*_haiku(lambda i: hk.Embed(20, 8)(i), ids), "embed/embeddings", ids),
        "hk.MultiHeadAttention": (
            *_haiku(
                lambda x: hk.MultiHeadAttention(2, 4, w_init=hk.initializers.VarianceScaling(1.0))(
                    x, x, x
                ),
                x8[None],
            ),
            r"(query|key|value|linear)/w",
            x8[None],
        ),
        "hk.layer_stack": (*_haiku(_layer_stack, x8), "linear/w", x8),
        **_flax_cases(),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_every_use_is_factored_and_exact(key, name):
    params, fn, targets, x = _cases()[name]
    cfg = jlora.LoraConfig(rank=2, targets=targets)
    adapter = randomize(jlora.init(key, params, cfg, fn, x), key)
    uses = jlora.explain(fn, params, adapter, x)
    assert uses and all(u == ["factored"] for u in uses.values()), uses
    check_against_materialized(fn, params, adapter, x)
    traces = []
    step = jax.jit(lambda p, a, x: traces.append(1) or jlora.apply(fn)(p, a, x))
    for i in range(2):  # another adapter of the same shapes: no retrace
        jax.block_until_ready(step(params, randomize(adapter, jax.random.fold_in(key, i)), x))
    assert len(traces) == 1
