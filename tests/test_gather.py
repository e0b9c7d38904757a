"""Embedding lookups of an adapted table, factored: ``E0[ids] + s * A[ids] @ B``.

Reference: the same function on the merged table (``check_against_materialized``:
outputs and adapter gradients, fp32 1e-5)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
import llama
from conftest import check_against_materialized, float_shapes, randomize
from jlora.interpret.dot import TRANSPOSED

V, D = 50, 16
IDS = jnp.array([[1, 2, 3], [49, 0, 7]])


class LinenEmbed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Embed(V, D, name="embed")(ids)


def _nnx_embed(key):
    graphdef, state = nnx.split(nnx.Embed(V, D, rngs=nnx.Rngs(0)))
    params = {"embed": {"embedding": state["embedding"][...]}}
    def fn(p, ids):
        st = jax.tree.map(lambda _: p["embed"]["embedding"], state)
        return nnx.merge(graphdef, st)(ids)
    return params, fn


def _cases(key):
    table = {"embed": {"embedding": jax.random.normal(key, (V, D))}}
    linen = LinenEmbed().init(key, IDS)
    return {"take": (table, lambda p, i: jnp.take(p["embed"]["embedding"], i, axis=0)),
            "index": (table, lambda p, i: p["embed"]["embedding"][i]),
            "clip": (table, lambda p, i: p["embed"]["embedding"].at[i].get(mode="clip")),
            "linen": (linen, LinenEmbed().apply),
            "nnx": _nnx_embed(key)}


@pytest.mark.parametrize("case", ["take", "index", "clip", "linen", "nnx"])
def test_lookups_are_factored(key, case):
    params, fn = _cases(key)[case]
    cfg = jlora.LoraConfig(rank=4, targets=("embed",))
    adapter = randomize(jlora.init(key, params, cfg, fn, IDS), key)
    (node,) = jlora.adapter.adapter_nodes(adapter).values()
    assert (node.in_axes, node.out_axes, node.a.shape, node.b.shape) == ((0,), (1,), (V, 4),
                                                                         (4, D))
    assert set(sum(jlora.explain(fn, params, adapter, IDS).values(), [])) == {"factored"}
    check_against_materialized(fn, params, adapter, IDS)


def test_a_tied_table_is_factored_at_both_sites(key):
    """Lookup and ``x @ E.T``: the lookup decides the axes (vocab "in", as PEFT)."""
    params = {"embed": jax.random.normal(key, (V, D))}
    fn = lambda p, ids: jnp.tanh(p["embed"][ids]) @ p["embed"].T
    adapter = randomize(jlora.init(key, params, jlora.LoraConfig(rank=4, targets=("embed",)),
                                   fn, IDS), key)
    assert adapter["embed"].in_axes == (0,)
    assert jlora.explain(fn, params, adapter, IDS) == {"embed": ["factored", TRANSPOSED]}
    check_against_materialized(fn, params, adapter, IDS)


def test_no_table_sized_array_in_the_train_step(key):
    """The frozen table is only ever an input: no equation of the LoRA step (forward and
    backward, with LoRA on the embedding and on the as large lm_head) outputs a float
    array of its size."""
    cfg = llama.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_heads=2,
                            num_layers=2)
    model = llama.Llama(cfg)
    params = llama.init_params(cfg, key)
    ids = jax.random.randint(key, (2, 9), 0, cfg.vocab_size)
    lcfg = jlora.LoraConfig(rank=4, targets=("embed_tokens", "lm_head", "q_proj", "v_proj"))
    adapter = randomize(jlora.init(key, params, lcfg, model.apply, ids[:, :-1]), key)
    loss = lambda ad: llama.loss_fn(jlora.apply(model.apply)(params, ad, ids[:, :-1]),
                                    ids[:, 1:])
    uses = jlora.explain(model.apply, params, adapter, ids[:, :-1])
    assert set(sum(uses.values(), [])) == {"factored"}
    table = cfg.vocab_size * cfg.hidden_size
    shapes = [s for s, _ in float_shapes(jax.make_jaxpr(jax.grad(loss))(adapter).jaxpr)]
    assert not [s for s in shapes if np.prod(s) >= table]
    ref = lambda ad: llama.loss_fn(model.apply(jlora.merge(params, ad), ids[:, :-1]),
                                   ids[:, 1:])
    for g, r in zip(jax.tree.leaves(jax.jit(jax.grad(loss))(adapter)),
                    jax.tree.leaves(jax.grad(ref)(adapter))):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("what, why", [
    ("column", "gather along the table's out axis"),
    ("dora", "gather of a DoRA table"),
    ("window", "gather that is not a row lookup"),
])
def test_other_gathers_are_materialized_and_say_why(key, what, why):
    params = {"embed": jax.random.normal(key, (V, D))}
    fn = {"column": lambda p, i: p["embed"][:, i[0]],
          "dora": lambda p, i: p["embed"][i],
          "window": lambda p, i: p["embed"][i, i % D]}[what]  # single elements
    cfg = jlora.LoraConfig(rank=4, targets=("embed",), dora=what == "dora")
    adapter = randomize(jlora.init(key, params, cfg), key)
    assert f"materialized ({why})" in jlora.explain(fn, params, adapter, IDS)["embed"]
    check_against_materialized(fn, params, adapter, IDS)
