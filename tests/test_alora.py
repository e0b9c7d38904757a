"""Activated LoRA: ``apply(..., lora_mask=)`` against closed-form math and the adapters alone.

(Against real PEFT: ``tests/test_alora_peft.py``.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import llama
import numpy as np
import pytest

import jlora
from conftest import F32, randomize

B, S, D, O = 3, 5, 8, 6
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear(key):
    params = {"w": jax.random.normal(key, (D, O))}
    ad = randomize(jlora.init(key, params, jlora.LoraConfig(rank=2, targets="w")), key, 0.5)
    x = jax.random.normal(jax.random.fold_in(key, 1), (B, S, D))
    mask = jax.random.uniform(jax.random.fold_in(key, 2), (B, S))
    return params, ad, x, mask


def _closed_form(params, node, x, mask):
    """``x W + s * m * (x A) B`` per token, written out."""
    low = jnp.einsum("bsd,dr,ro->bso", x, node.a, node.b) * node.scale
    return jnp.einsum("bsd,do->bso", x, params["w"]) + mask[..., None] * low


MODELS = {  # each keeps token (b, s)'s rows apart up to the weight, in a different layout
    "plain": lambda p, x: x @ p["w"],
    "flattened": lambda p, x: (x.reshape(B * S, D) @ p["w"]).reshape(B, S, O),
    "seq-major": lambda p, x: jnp.swapaxes(jnp.swapaxes(x, 0, 1) @ p["w"], 0, 1),
    "remat": jax.checkpoint(lambda p, x: (x.reshape(B * S, D) @ p["w"]).reshape(B, S, O)),
    "scanned": lambda p, x: (
        jax.lax.scan(lambda c, _: (c + x @ p["w"], None), jnp.zeros((B, S, O)), None, length=2)[0]
        / 2
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_and_gradients_are_the_closed_form(name, key):
    params, ad, x, mask = _linear(key)
    fn = MODELS[name]
    f = jax.jit(jlora.apply(fn))
    np.testing.assert_allclose(
        f(params, ad, x, lora_mask=mask), _closed_form(params, ad["w"], x, mask), **F32
    )
    loss = lambda a: jnp.sum(jnp.sin(f(params, a, x, lora_mask=mask)))
    want = lambda a: jnp.sum(jnp.sin(_closed_form(params, a["w"], x, mask)))
    for g, w in zip(jax.tree.leaves(jax.grad(loss)(ad)), jax.tree.leaves(jax.grad(want)(ad))):
        # each entry sums 90 float32 products, the largest entry ~33: against a float64
        # closed form both sides are exact to ~1.4e-6 of the largest entry (measured), so a
        # fixed atol of 1e-5 sat below float32's resolution for the small entries
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=5e-6 * np.abs(w).max())
    assert set(jlora.explain(fn, params, ad, x, lora_mask=mask)["w"]) == {
        "factored (gated by lora_mask)"
    }


def _attend(q, k):
    return jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2), -1) @ k


#: Single-request code squeezes the size-1 axes of the mask's shape away: ``(x, mask)``
#: shapes, the model, and its closed form given the gated projection ``proj(x)``.
SQUEEZING = {
    "batch squeezed": (
        (1, S, D),
        lambda p, x: (jnp.squeeze(x, 0) @ p["w"])[None],
        lambda proj, x: proj(x),
    ),
    "token squeezed (decoding)": (
        (B, 1, D),
        lambda p, x: (x[:, 0] @ p["w"])[:, None],
        lambda proj, x: proj(x),
    ),
    "both squeezed": (
        (1, 1, D),
        lambda p, x: (x[0, 0] @ p["w"])[None, None],
        lambda proj, x: proj(x),
    ),
    "attention, batch squeezed": (
        (1, S, D),
        lambda p, x: _attend(x[0] @ p["w"], x[0] @ p["w"])[None],
        lambda proj, x: _attend(proj(x), proj(x)),
    ),
}


@pytest.mark.parametrize("name", list(SQUEEZING))
def test_size_1_mask_axes_squeezed_away_are_fine(name, key):
    """One request (mask (1, S)) or one decoded token ((B, 1), (1, 1)): a model that
    squeezes that axis away is gated right (every row is entry 0 along it)."""
    shape, fn, closed = SQUEEZING[name]
    params, ad, _, _ = _linear(key)
    x = jax.random.normal(jax.random.fold_in(key, 3), shape)
    mask = jax.random.uniform(jax.random.fold_in(key, 4), shape[:2])
    want = closed(lambda x: _closed_form(params, ad["w"], x, mask), x)
    np.testing.assert_allclose(jax.jit(jlora.apply(fn))(params, ad, x, lora_mask=mask), want, **F32)


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda p, x: jnp.flip(x, 1) @ p["w"], "order was lost"),
        (lambda p, x: x.mean(1) @ p["w"], "do not depend on that axis"),
        (lambda p, x: jnp.concatenate([x, x], 1) @ p["w"], "order was lost"),
        (lambda p, x: jnp.einsum("bsd,bsd->bd", x, x) @ p["w"], "do not depend"),
        (lambda p, x: jnp.sort(x, axis=1) @ p["w"], "lost on the way"),
    ],
)
def test_a_row_whose_token_cannot_be_told_is_refused(fn, match, key):
    params, ad, x, mask = _linear(key)
    with pytest.raises(jlora.LoraError, match=match):
        jlora.apply(fn)(params, ad, x, lora_mask=mask)


def test_a_square_mask_is_refused(key):
    """Mask axes of one size: a (seq, batch, d) input leads with the mask's shape as well
    as a (batch, seq, d) one, so which is which cannot be told; refused, not guessed."""
    params, ad, _, _ = _linear(key)
    x = jax.random.normal(key, (S, S, D))
    with pytest.raises(jlora.LoraError, match="two axes of the same size"):
        jlora.apply(MODELS["plain"])(params, ad, x, lora_mask=jnp.ones((S, S), bool))
    one = jlora.apply(MODELS["plain"])(params, ad, x[:1, :1], lora_mask=jnp.ones((1, 1)))
    np.testing.assert_allclose(
        one, _closed_form(params, ad["w"], x[:1, :1], jnp.ones((1, 1))), **F32
    )


def test_uses_that_cannot_be_gated_are_refused(key):
    params, ad, x, mask = _linear(key)
    with pytest.raises(jlora.LoraError, match="used as .materialized .custom_vjp"):
        clip = jax.custom_vjp(lambda w: w)
        clip.defvjp(lambda w: (w, None), lambda _, g: (g,))
        jlora.apply(lambda p, x: x @ clip(p["w"]))(params, ad, x, lora_mask=mask)
    table = {"embed": jax.random.normal(key, (16, D))}
    emb = jlora.init(key, table, jlora.LoraConfig(rank=2, targets="embed"))
    ids = jnp.zeros((B, S), jnp.int32)
    with pytest.raises(jlora.LoraError, match="per-token gate cannot apply"):
        jlora.apply(lambda p, i: p["embed"][i])(table, emb, ids, lora_mask=mask)
    dora = jlora.init(key, params, jlora.LoraConfig(rank=2, targets="w", dora=True))
    with pytest.raises(jlora.LoraError, match="DoRA"):
        jlora.apply(MODELS["plain"])(params, dora, x, lora_mask=mask)
    with pytest.raises(TypeError, match="bool or float"):
        jlora.apply(MODELS["plain"])(params, ad, x, lora_mask=jnp.ones((B, S), jnp.int32))


def test_bad_settings_are_refused():
    with pytest.raises(jlora.LoraError, match="non-empty tuple of token ids"):
        jlora.LoraConfig(targets="w", alora_invocation_tokens=[])
    with pytest.raises(jlora.LoraError, match="choose one"):
        jlora.LoraConfig(targets="w", alora_invocation_tokens=[1], dora=True)
    with pytest.raises(TypeError, match="integer token ids"):
        jlora.alora_mask(jnp.zeros((2, 3)), [1])
    with pytest.raises(ValueError, match="empty"):
        jlora.alora_mask(jnp.zeros((2, 3), jnp.int32), [[1], []])
    with pytest.raises(ValueError, match="one per row"):
        jlora.alora_mask(jnp.zeros((2, 3), jnp.int32), [[1]])


def _tiny(scan=True):
    cfg = llama.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        scan_layers=scan,
    )
    return llama.Llama(cfg), llama.init_params(cfg, jax.random.key(0)), cfg


def _alora(params, key, tokens, rank=2):
    cfg = jlora.LoraConfig(rank=rank, targets=PROJ, alora_invocation_tokens=tokens)
    return randomize(jlora.init(key, params, cfg), key, 0.3)


def test_each_row_of_a_mixed_batch_equals_its_adapter_alone(key):
    model, params, _ = _tiny()
    ads = [
        _alora(params, jax.random.fold_in(key, 0), (3, 4)),
        _alora(params, jax.random.fold_in(key, 1), (5,), rank=3),
        randomize(jlora.init(key, params, jlora.LoraConfig(rank=2, targets=PROJ)), key, 0.3),
    ]
    ids = np.array(jax.random.randint(key, (4, 9), 6, 32))
    ids[0, 2:4], ids[1, 5], ids[3, 1:3] = (3, 4), 5, (3, 4)
    adapter_ids = jnp.array([0, 1, 2, -1])
    stacked = jlora.stack(ads)
    mask = jlora.alora_mask(ids, stacked, adapter_ids=adapter_ids)
    np.testing.assert_array_equal(mask[:2].argmax(1), [2, 5])
    assert bool(mask[2].all())  # a plain adapter's row acts everywhere
    f = jax.jit(jlora.apply(model.apply))
    got = f(params, stacked, jnp.asarray(ids), adapter_ids=adapter_ids, lora_mask=mask)
    for row, k in enumerate(adapter_ids.tolist()):
        one = ids[row : row + 1]
        if k < 0:
            want = model.apply(params, one)
        elif ads[k]["params"]["layers"]["mlp"]["up_proj"]["kernel"].invocation:
            want = f(params, ads[k], one, lora_mask=jlora.alora_mask(one, ads[k]))
        else:
            want = f(params, ads[k], one)
        np.testing.assert_allclose(got[row : row + 1], want, **F32)


@pytest.mark.parametrize("batch", [2, 1])
@pytest.mark.parametrize("scan", [True, False])
def test_decoding_with_a_cache_continues_the_prompt(scan, batch, key):
    """Prefill, then one token at a time with ``mask[:, -1:]``: the logits of the whole
    sequence run at once; one request (batch 1, masks (1, S) then (1, 1)) as two."""
    model, params, cfg = _tiny(scan)
    ad = _alora(params, key, (3, 4))
    ids = np.array(jax.random.randint(key, (2, 10), 6, 32))
    ids[0, 3:5] = (3, 4)  # row 1 never invokes: the base throughout
    ids = ids[:batch]
    prompt, n = 6, 10
    f = jax.jit(jlora.apply(model.apply))
    want = f(params, ad, jnp.asarray(ids), lora_mask=jlora.alora_mask(ids, ad))
    pos = lambda a, b: jnp.broadcast_to(jnp.arange(a, b)[None], (batch, b - a))
    mask = jlora.alora_mask(ids[:, :prompt], ad)
    cache = llama.init_cache(cfg, batch, n)
    logits, cache = f(
        params, ad, jnp.asarray(ids[:, :prompt]), pos(0, prompt), cache=cache, lora_mask=mask
    )
    got = [logits]
    for t in range(prompt, n):
        logits, cache = f(
            params,
            ad,
            jnp.asarray(ids[:, t : t + 1]),
            pos(t, t + 1),
            cache=cache,
            lora_mask=mask[:, -1:],
        )
        got.append(logits)
    np.testing.assert_allclose(jnp.concatenate(got, 1), want, **F32)
    base = jax.jit(model.apply)(params, jnp.asarray(ids))
    assert not np.allclose(want[0], base[0])  # row 0 invokes the adapter
    if batch == 2:
        np.testing.assert_array_equal(want[1], base[1])


def test_invocation_survives_checkpoints_stack_and_unstack(tmp_path, key):
    params, _, _, _ = _linear(key)
    ad = jlora.init(
        key, params, jlora.LoraConfig(rank=2, targets="w", alora_invocation_tokens=[7, 8])
    )
    jlora.save_adapter(str(tmp_path / "a"), ad)
    assert jlora.load_adapter(str(tmp_path / "a"), params)["w"].invocation == (7, 8)
    plain = dataclasses.replace(ad["w"], invocation=None)
    stacked = jlora.stack([ad, {"w": plain}])
    assert stacked["w"].invocations == ((7, 8), None)
    assert [a["w"].invocation for a in jlora.unstack(stacked)] == [(7, 8), None]
