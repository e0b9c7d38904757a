"""Activated LoRA against the real PEFT (the ``interop`` extra): a tiny random Llama, fp32.

PEFT computes each row's activation from the input ids (``alora_invocation_tokens``)
and adds the update from the start of the invocation's last occurrence on; jlora
gets the same from ``apply(..., lora_mask=jlora.alora_mask(ids, adapter))``.
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
from peft.tuners.lora.variants import calculate_alora_offsets  # noqa: E402

import jlora  # noqa: E402
from conftest import randomize  # noqa: E402

HF = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
TOL = dict(rtol=1e-4, atol=1e-4)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INVOKE = [7, 9, 3]


def _hf_base():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**HF, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


def _ids():
    """Rows: invocation mid-sequence, twice (the last counts), at the very end, absent."""
    ids = np.random.default_rng(1).integers(10, HF["vocab_size"], (4, 12))
    ids[0, 4:7] = INVOKE
    ids[1, 1:4] = INVOKE
    ids[1, 6:9] = INVOKE
    ids[2, 9:12] = INVOKE
    return ids


def _peft_alora(tokens=INVOKE, seed=0):
    """A PEFT aLoRA trained a few steps (B nonzero) on random ids holding the invocation."""
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
        alora_invocation_tokens=list(tokens),
    )
    model = peft.get_peft_model(_hf_base(), cfg)
    torch.manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.tensor(_ids())
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    return model.eval()


def _peft_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("scan", [True, False])
def test_peft_alora_loads_and_matches(tmp_path, scan):
    pm = _peft_alora()
    pm.save_pretrained(tmp_path)
    cfg = llama.config_from_hf(pm.base_model.model.config, scan_layers=scan)
    model, params = llama.Llama(cfg), llama.from_hf(_hf_base().state_dict(), cfg)
    ad = jlora.peft.load(str(tmp_path), params, module_fn=llama.hf_module)
    nodes = jlora._src.adapter.adapter_nodes(ad).values()
    assert {n.invocation for n in nodes} == {tuple(INVOKE)}
    assert all(float(jnp.abs(n.b).max()) > 0 for n in nodes)
    ids = _ids()
    mask = jlora.alora_mask(ids, ad)
    f = jax.jit(jlora.apply(model.apply))
    got = np.asarray(f(params, ad, jnp.asarray(ids), lora_mask=mask))
    np.testing.assert_allclose(got, _peft_logits(pm, ids), **TOL)
    base = np.asarray(jax.jit(model.apply)(params, jnp.asarray(ids)))
    starts = [4, 6, 9, 12]
    for row, s in enumerate(starts):  # before the invocation: the base's logits, exactly
        np.testing.assert_array_equal(got[row, :s], base[row, :s])
        assert s == 12 or np.abs(got[row, s:] - base[row, s:]).max() > 1e-3
    with pytest.raises(jlora.LoraError, match="lora_mask=jlora.alora_mask"):
        jlora.apply(model.apply)(params, ad, jnp.asarray(ids))
    with pytest.raises(jlora.LoraError, match="activated LoRA"):
        jlora.merge(params, ad)


def test_alora_mask_is_peft_offsets():
    rng = np.random.default_rng(3)
    for trial in range(20):
        tokens = [int(t) for t in rng.integers(0, 4, rng.integers(1, 4))]
        ids = rng.integers(0, 4, (5, int(rng.integers(1, 12))))
        config = {"a": peft.LoraConfig(alora_invocation_tokens=tokens, task_type="CAUSAL_LM")}
        offsets = calculate_alora_offsets(config, "a", torch.tensor(ids))
        n = ids.shape[1]
        want = np.stack(
            [np.zeros(n, bool) if o is None else np.arange(n) >= n - o for o in offsets]
        )
        np.testing.assert_array_equal(
            np.asarray(jlora.alora_mask(ids, tokens)),
            want,
            err_msg=f"trial {trial}: {tokens} in {ids}",
        )


def test_jlora_alora_saves_for_peft(tmp_path, key):
    cfg = llama.config_from_hf(_hf_base().config)
    model, params = llama.Llama(cfg), llama.from_hf(_hf_base().state_dict(), cfg)
    lcfg = jlora.LoraConfig(
        rank=4, alpha=8.0, targets=tuple(TARGETS), alora_invocation_tokens=INVOKE
    )
    ad = randomize(jlora.init(key, params, lcfg), key)
    jlora.peft.save(str(tmp_path), ad, module_fn=llama.hf_module)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["alora_invocation_tokens"] == INVOKE and saved["task_type"] == "CAUSAL_LM"
    pm = peft.PeftModel.from_pretrained(_hf_base(), str(tmp_path)).eval()
    ids = _ids()
    got = jlora.apply(model.apply)(
        params, ad, jnp.asarray(ids), lora_mask=jlora.alora_mask(ids, INVOKE)
    )
    np.testing.assert_allclose(np.asarray(got), _peft_logits(pm, ids), **TOL)
