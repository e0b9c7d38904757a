"""Leaves trained beside the factors: in full (``modules_to_save``) and by chosen rows of a
table (``trainable_token_indices``).

Reference: the same function on ``jlora.merge``'s tree, which writes the trained values
in (outputs and gradients, fp32). PEFT itself: ``test_peft_whole.py``.
"""

import jax
import jax.numpy as jnp
import llama
import numpy as np
import optax
import pytest

import jlora
from conftest import float_shapes, randomize
from jlora._src.adapter import FullNode, TokenNode

CFG = llama.LlamaConfig(
    vocab_size=512, hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2
)
TOKENS = (3, 500, 17)


def _model(key, tied):
    cfg = llama.LlamaConfig(**{**CFG.__dict__, "tie_embeddings": tied})
    ids = jax.random.randint(key, (2, 9), 0, cfg.vocab_size).at[:, 0].set(500)
    return llama.Llama(cfg), llama.init_params(cfg, key), ids


def _grads_match_merged(model, params, adapter, ids):
    loss = lambda ad: llama.loss_fn(jlora.apply(model.apply)(params, ad, ids[:, :-1]), ids[:, 1:])
    ref = lambda ad: llama.loss_fn(model.apply(jlora.merge(params, ad), ids[:, :-1]), ids[:, 1:])
    np.testing.assert_allclose(jax.jit(loss)(adapter), ref(adapter), rtol=1e-5)
    for g, r in zip(
        jax.tree.leaves(jax.jit(jax.grad(loss))(adapter)), jax.tree.leaves(jax.grad(ref)(adapter))
    ):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    return loss


def test_token_rows_of_a_tied_table_are_factored_with_no_table_sized_array(key):
    """Lookup and tied logits both read the rows; the step's only (k, d) gradient is the
    rows': forward and backward make no array of the table's size beyond the one the
    frozen model itself makes (Flax's ``attend`` transposes the table)."""
    model, params, ids = _model(key, tied=True)
    cfg = jlora.LoraConfig(
        rank=4, targets=("q_proj", "v_proj"), trainable_token_indices={"embed_tokens": TOKENS}
    )
    adapter = randomize(jlora.init(key, params, cfg, model.apply, ids[:, :-1]), key)
    node = adapter["params"]["embed_tokens"]["embedding"]
    assert isinstance(node, TokenNode) and node.rows.shape == (3, CFG.hidden_size)
    uses = jlora.explain(model.apply, params, adapter, ids[:, :-1])
    assert len(uses["params/embed_tokens/embedding"]) == 2
    assert all(u.startswith("factored") for u in sum(uses.values(), []))
    loss = _grads_match_merged(model, params, adapter, ids)
    big = lambda jaxpr: sorted(
        s for s, _ in float_shapes(jaxpr.jaxpr) if np.prod(s) >= CFG.vocab_size * CFG.hidden_size
    )
    frozen = big(jax.make_jaxpr(model.apply)(params, ids[:, :-1]))
    assert frozen == [(CFG.hidden_size, CFG.vocab_size)]
    assert big(jax.make_jaxpr(jax.grad(loss))(adapter)) == frozen
    merged = jlora.merge(params, adapter)["params"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(merged[np.array(TOKENS)], node.rows)  # written exactly
    others = np.setdiff1d(np.arange(CFG.vocab_size), TOKENS)
    np.testing.assert_array_equal(
        merged[others], params["params"]["embed_tokens"]["embedding"][others]
    )


def test_full_modules_train_save_and_group_with_a(key, tmp_path):
    """lm_head and the scanned norms trained in full: outputs and gradients equal the
    merged model's, a copy (the base is untouched), LoRA+ group a, saved and loaded."""
    model, params, ids = _model(key, tied=False)
    cfg = jlora.LoraConfig(
        rank=4, targets=("q_proj", "v_proj"), modules_to_save=("lm_head", "input_layernorm")
    )
    adapter = jlora.init(key, params, cfg, model.apply, ids[:, :-1])
    head = adapter["params"]["lm_head"]["kernel"]
    norm = adapter["params"]["layers"]["input_layernorm"]["weight"]
    assert isinstance(head, FullNode) and isinstance(norm, FullNode)
    assert norm.shape == (CFG.num_layers, CFG.hidden_size)
    np.testing.assert_array_equal(head.weight, params["params"]["lm_head"]["kernel"])
    adapter = randomize(adapter, key)
    _grads_match_merged(model, params, adapter, ids)
    labels = jlora._src.optim.labels(adapter)
    assert labels["params"]["lm_head"]["kernel"].weight == "a"
    assert labels["params"]["layers"]["input_layernorm"]["weight"].weight == "a"
    tx = jlora.loraplus(optax.sgd, learning_rate=0.1)
    upd, _ = tx.update(jax.tree.map(jnp.ones_like, adapter), tx.init(adapter))
    np.testing.assert_allclose(upd["params"]["lm_head"]["kernel"].weight, -0.1)
    jlora.save_adapter(tmp_path / "ad", adapter)
    back = jlora.load_adapter(tmp_path / "ad", params)
    assert jax.tree.structure(back) == jax.tree.structure(adapter)
    for a, b in zip(jax.tree.leaves(adapter), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)


def test_bad_inputs_name_the_field_and_path(key):
    _, params, _ = _model(key, tied=False)
    init = lambda **kw: jlora.init(key, params, jlora.LoraConfig(rank=2, **kw))
    with pytest.raises(jlora.LoraError, match="lm_head.*both a LoRA target"):
        init(targets=("lm_head",), modules_to_save=("lm_head",))
    with pytest.raises(jlora.LoraError, match="token 600 is past the 512 rows"):
        init(trainable_token_indices=[600])
    with pytest.raises(jlora.LoraError, match="lm_head/kernel.*dense kernel"):
        init(trainable_token_indices={"lm_head": [1]})  # (d, vocab): rows are not tokens
    with pytest.raises(jlora.LoraError, match="exactly one embedding table"):
        init(trainable_token_indices={"layers": [1]})
    with pytest.raises(jlora.LoraError, match="distinct non-negative"):
        jlora.LoraConfig(trainable_token_indices=[1, 1])
    with pytest.raises(
        jlora.LoraError, match="modules_to_save=.*'nothing_here' matched no parameter"
    ):
        init(modules_to_save=("nothing_here",))
    with pytest.raises(jlora.LoraError, match="modules_to_save=.*matched no float"):
        init(modules_to_save=r"nothing_here")  # a regex: matched as given, then checked
    adapter = init(
        targets=("q_proj",), modules_to_save=("lm_head",), trainable_token_indices=[1, 2]
    )
    merged = jlora.merge(params, adapter)
    bad = jax.tree.map(  # a diverged token row: merge says so rather than writing it
        lambda n: (
            TokenNode(n.rows.at[0].set(jnp.nan), n.indices, n.shape)
            if isinstance(n, TokenNode)
            else n
        ),
        adapter,
        is_leaf=lambda n: isinstance(n, TokenNode),
    )
    with pytest.raises(jlora.LoraError, match="embed_tokens.*non-finite"):
        jlora.merge(params, bad)
    with pytest.raises(jlora.LoraError, match="keep the base"):
        jlora.unmerge(merged, adapter)
    with pytest.raises(jlora.LoraError, match="mixed batches do not serve"):
        jlora.stack([adapter, adapter])
    quant = jlora.quantize(params, targets=("embed_tokens",))
    with pytest.raises(jlora.LoraError, match="NF4"):
        jlora.init(key, quant, jlora.LoraConfig(targets=(), trainable_token_indices=[1]))
    only = init(targets=(), trainable_token_indices=[1, 2])  # tokens alone need no targets
    assert set(jlora._src.adapter.adapter_nodes(only)) == {"params/embed_tokens/embedding"}
