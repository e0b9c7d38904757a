"""Modules trained in full (PEFT's ``modules_to_save``) and trainable tokens
(``trainable_token_indices``) against real PEFT and transformers, fp32, both directions.

The same random LlamaForCausalLM (built from a config, nothing downloaded) runs in torch
and, converted, in the example Flax model.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import llama  # noqa: E402
from test_peft import HF, TOL, _hf_base, _jlora_base, _torch_logits  # noqa: E402

import jlora  # noqa: E402
from conftest import randomize  # noqa: E402

TOKENS = [3, 5, 7]
EXTRA = dict(
    modules_to_save=["lm_head", "input_layernorm"], trainable_token_indices={"embed_tokens": TOKENS}
)


def _ids(seed=1):
    ids = np.random.default_rng(seed).integers(0, HF["vocab_size"], (2, 10))
    ids[:, :3] = TOKENS  # the trained rows are read
    return ids


def _peft_trained(tied=False, **extra):
    """LoRA on q,v plus the extras, trained a few steps so every part moved."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **extra)
    model = peft.get_peft_model(_hf_base(tied), cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor(_ids(2))
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("scan", [True, False])
def test_peft_modules_to_save_and_tokens_load_into_jlora(tmp_path, scan):
    pm = _peft_trained(**EXTRA)
    pm.save_pretrained(tmp_path)
    model, params = _jlora_base(_hf_base(), scan)
    ad = jlora.peft.load(str(tmp_path), params, module_fn=llama.hf_module)
    table = ad["params"]["embed_tokens"]["embedding"]
    assert isinstance(table, jlora._src.adapter.TokenNode) and table.indices == tuple(TOKENS)
    assert isinstance(ad["params"]["lm_head"]["kernel"], jlora._src.adapter.FullNode)
    ids = _ids()
    np.testing.assert_allclose(
        jlora.apply(model.apply)(params, ad, jnp.asarray(ids)), _torch_logits(pm, ids), **TOL
    )
    merged = jlora.merge(params, ad)  # PEFT's merge_and_unload gives the same weights
    hf_merged = llama.from_hf(pm.merge_and_unload().state_dict(), model.config)
    for m, h in zip(jax.tree.leaves(merged), jax.tree.leaves(hf_merged)):
        np.testing.assert_allclose(m, h, rtol=1e-5, atol=1e-6)


def test_jlora_modules_to_save_and_tokens_load_into_peft(tmp_path, key):
    model, params = _jlora_base(_hf_base())
    cfg = jlora.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=("q_proj", "v_proj"),
        modules_to_save=("lm_head", "input_layernorm"),
        trainable_token_indices={"embed_tokens": TOKENS},
    )
    ad = randomize(jlora.init(key, params, cfg), key)
    jlora.peft.save(str(tmp_path), ad, module_fn=llama.hf_module)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["input_layernorm", "lm_head"]
    assert config["trainable_token_indices"] == {"embed_tokens": TOKENS}
    pm = peft.PeftModel.from_pretrained(_hf_base(), str(tmp_path)).eval()
    ids = _ids()
    np.testing.assert_allclose(
        _torch_logits(pm, ids), jlora.apply(model.apply)(params, ad, jnp.asarray(ids)), **TOL
    )
    back = jlora.peft.load(str(tmp_path), params, module_fn=llama.hf_module)
    for mine, got in zip(jax.tree.leaves(ad), jax.tree.leaves(back)):
        np.testing.assert_array_equal(mine, got)


def test_tied_embedding_tokens_stay_factored_at_both_uses(tmp_path):
    """A tied model (lm_head = embed.T): PEFT's token rows change the lookup and the
    logits alike; jlora reads both uses factored, with PEFT's logits."""
    pm = _peft_trained(tied=True, trainable_token_indices=TOKENS)
    pm.save_pretrained(tmp_path)
    model, params = _jlora_base(_hf_base(tied=True))
    assert "lm_head" not in params["params"]
    ad = jlora.peft.load(str(tmp_path), params, module_fn=llama.hf_module)
    ids = _ids()
    np.testing.assert_allclose(
        jlora.apply(model.apply)(params, ad, jnp.asarray(ids)), _torch_logits(pm, ids), **TOL
    )
    uses = jlora.explain(model.apply, params, ad, ids)["params/embed_tokens/embedding"]
    assert len(uses) == 2 and all(u.startswith("factored") for u in uses)
