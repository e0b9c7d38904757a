"""jlora adapters against the real PEFT and transformers (the ``interop`` extra), fp32.

The same random LlamaForCausalLM (built here from a config: nothing is downloaded)
runs in torch and, converted, in the example Flax model.
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

import jlora  # noqa: E402
from conftest import randomize  # noqa: E402

HF = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
TOL = dict(rtol=1e-4, atol=1e-4)
VARIANTS = {"lora": {}, "rslora": dict(use_rslora=True), "dora": dict(use_dora=True)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]


def _hf_base(tied=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**HF, attn_implementation="eager", tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def _jlora_base(hf, scan=True):
    cfg = llama.config_from_hf(hf.config, scan_layers=scan)
    return llama.Llama(cfg), llama.from_hf(hf.state_dict(), cfg)


def _ids(seed=1):
    return np.random.default_rng(seed).integers(0, HF["vocab_size"], (2, 10))


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _peft_trained(variant, steps=3, **extra):
    """A PEFT adapter trained a few steps (so B is not zero) on random tokens."""
    extra = {"target_modules": TARGETS, **extra}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **VARIANTS[variant], **extra)
    model = peft.get_peft_model(_hf_base(), cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor(_ids(2))
    for _ in range(steps):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("scan", [True, False])
def test_peft_trained_adapter_loads_into_jlora(tmp_path, variant, scan):
    pm = _peft_trained(variant, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})
    pm.save_pretrained(tmp_path)
    model, params = _jlora_base(_hf_base(), scan)
    ad = jlora.peft.load(str(tmp_path), params, module_fn=llama.hf_module)
    ids = _ids()
    assert any(float(jnp.abs(n.b).max()) > 0 for n in jlora._src.adapter.adapter_nodes(ad).values())
    want = _torch_logits(pm, ids)
    np.testing.assert_allclose(jlora.apply(model.apply)(params, ad, jnp.asarray(ids)), want, **TOL)
    merged = jlora.merge(params, ad)  # PEFT's merge_and_unload gives the same weights
    hf_merged = llama.from_hf(pm.merge_and_unload().state_dict(), model.config)
    for m, h in zip(jax.tree.leaves(merged), jax.tree.leaves(hf_merged)):
        np.testing.assert_allclose(m, h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_jlora_adapter_loads_into_peft(tmp_path, key, variant):
    model, params = _jlora_base(_hf_base())
    cfg = jlora.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=tuple(TARGETS),
        rslora=variant == "rslora",
        dora=variant == "dora",
        rank_pattern={"v_proj": 2},
        alpha_pattern={"o_proj": 5.0},
    )
    ad = randomize(jlora.init(key, params, cfg), key)
    jlora.peft.save(str(tmp_path), ad, module_fn=llama.hf_module)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] == (variant == "dora") and config["r"] == 4
    pm = peft.PeftModel.from_pretrained(_hf_base(), str(tmp_path)).eval()
    ids = _ids()
    np.testing.assert_allclose(
        _torch_logits(pm, ids), jlora.apply(model.apply)(params, ad, jnp.asarray(ids)), **TOL
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_embedding_adapters_both_directions(tmp_path, key, variant):
    """An adapted nn.Embedding (PEFT's lora_embedding_A (r, vocab), lora_embedding_B (d, r))
    next to linear targets: PEFT -> jlora and jlora -> PEFT give PEFT's logits; the
    jlora lookup is factored."""
    targets = TARGETS + ["embed_tokens"]
    pm = _peft_trained(variant, target_modules=targets)
    pm.save_pretrained(tmp_path / "peft")
    model, params = _jlora_base(_hf_base())
    ad = jlora.peft.load(str(tmp_path / "peft"), params, module_fn=llama.hf_module)
    table = ad["params"]["embed_tokens"]["embedding"]
    assert table.a.shape == (HF["vocab_size"], 4) and float(jnp.abs(table.b).max()) > 0
    ids = _ids()
    np.testing.assert_allclose(
        jlora.apply(model.apply)(params, ad, jnp.asarray(ids)), _torch_logits(pm, ids), **TOL
    )
    assert jlora.explain(model.apply, params, ad, ids)["params/embed_tokens/embedding"] == [
        "factored"
    ]
    cfg = jlora.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=tuple(targets),
        rslora=variant == "rslora",
        dora=variant == "dora",
    )
    mine = randomize(jlora.init(key, params, cfg, model.apply, ids), key)
    jlora.peft.save(str(tmp_path / "jlora"), mine, module_fn=llama.hf_module)
    back = peft.PeftModel.from_pretrained(_hf_base(), str(tmp_path / "jlora")).eval()
    np.testing.assert_allclose(
        _torch_logits(back, ids), jlora.apply(model.apply)(params, mine, jnp.asarray(ids)), **TOL
    )


def test_load_errors(tmp_path):
    pm = _peft_trained("lora", steps=1)
    pm.save_pretrained(tmp_path)
    _, params = _jlora_base(_hf_base())
    with pytest.raises(ValueError, match="match no parameter.*module_fn"):
        jlora.peft.load(str(tmp_path), params)  # default mapping lacks the 'model.' level
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for field, value, message in [
        ("layer_replication", [[0, 1]], "layer_replication.*copying"),
        ("bias", "some", "bias='some'"),
        ("init_lora_weights", "pissa", "changed the base weights"),
        ("peft_type", "IA3", "is not LORA"),
    ]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=message):
            jlora.peft.load(str(tmp_path), params, module_fn=llama.hf_module)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match="rank 4 but the config says 8"):
        jlora.peft.load(str(tmp_path), params, module_fn=llama.hf_module)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    small = llama.from_hf(_hf_base().state_dict(), llama.config_from_hf(_hf_base().config))
    small = jax.tree.map(lambda x: x[..., :16] if x.ndim == 3 and x.shape[-1] == 32 else x, small)
    with pytest.raises(ValueError, match="needs"):
        jlora.peft.load(str(tmp_path), small, module_fn=llama.hf_module)
    raw = (tmp_path / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        jlora.peft.load(str(tmp_path), params, module_fn=llama.hf_module)


def test_a_file_missing_a_layer_adapts_the_others_of_a_scanned_stack(tmp_path, key):
    """As PEFT itself does with missing keys (those layers keep B = 0): the scanned
    model gets a node on the layers the file has, with the unscanned model's logits."""
    model, params = _jlora_base(_hf_base(), scan=False)
    ad = randomize(jlora.init(key, params, jlora.LoraConfig(rank=2, targets=("q_proj",))), key)
    jlora.peft.save(str(tmp_path), ad, module_fn=llama.hf_module)
    scanned_model, stacked = _jlora_base(_hf_base(), scan=True)
    import safetensors.numpy

    file = tmp_path / "adapter_model.safetensors"
    tensors = safetensors.numpy.load(file.read_bytes())
    file.write_bytes(safetensors.numpy.save({k: v for k, v in tensors.items() if ".1." not in k}))
    got = jlora.peft.load(str(tmp_path), stacked, module_fn=llama.hf_module)
    node = got["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(node, jlora._src.adapter.LayersNode) and node.layers == (0,)
    one = jlora.peft.load(str(tmp_path), params, module_fn=llama.hf_module)
    ids = jnp.asarray(_ids())
    np.testing.assert_allclose(
        jlora.apply(scanned_model.apply)(stacked, got, ids),
        jlora.apply(model.apply)(params, one, ids),
        **TOL,
    )


def test_bf16_adapters_round_trip_through_safetensors(tmp_path, key):
    """The safetensors package writes and reads bf16 as stored (no float32 detour)."""
    _, params = _jlora_base(_hf_base())
    params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=tuple(TARGETS), dtype="base")
    ad = randomize(jlora.init(key, params, cfg), key)
    jlora.peft.save(str(tmp_path), ad, module_fn=llama.hf_module)
    back = jlora.peft.load(str(tmp_path), params, module_fn=llama.hf_module)
    for mine, got in zip(jax.tree.leaves(ad), jax.tree.leaves(back)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(mine, np.float32), np.asarray(got, np.float32))


def test_peft_layers_to_transform_both_directions(tmp_path, key):
    """A PEFT adapter on layer 1 only loads into the unscanned model (layer 0 stays
    unadapted) and into the scanned one (a node on layer 1 of the stack) with PEFT's
    logits; a jlora adapter on layer 1 of a scanned stack loads into PEFT the same way."""
    pm = _peft_trained("lora", layers_to_transform=[1])
    pm.save_pretrained(tmp_path / "peft")
    ids = _ids()
    for scan in (False, True):
        model, params = _jlora_base(_hf_base(), scan=scan)
        ad = jlora.peft.load(str(tmp_path / "peft"), params, module_fn=llama.hf_module)
        nodes = jlora._src.adapter.adapter_nodes(ad)
        assert nodes and all("layers_1" in p or n.layers == (1,) for p, n in nodes.items())
        np.testing.assert_allclose(
            jlora.apply(model.apply)(params, ad, jnp.asarray(ids)), _torch_logits(pm, ids), **TOL
        )
    cfg = jlora.LoraConfig(rank=4, targets=tuple(TARGETS), layers_to_transform=[1])
    ad = randomize(jlora.init(key, params, cfg), key)
    jlora.peft.save(str(tmp_path / "jlora"), ad, module_fn=llama.hf_module)
    back = peft.PeftModel.from_pretrained(_hf_base(), str(tmp_path / "jlora")).eval()
    np.testing.assert_allclose(
        _torch_logits(back, ids), jlora.apply(model.apply)(params, ad, jnp.asarray(ids)), **TOL
    )


def test_two_targets_on_one_module_name_are_refused(tmp_path):
    """Top-level leaves {"q": W, "v": W} both map to module '' by default: an error naming
    both, not a file holding one target's factors; a module_fn that tells them apart works."""
    w = jnp.ones((4, 6))
    params = {"q": w, "v": w}
    ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets=("q", "v")))
    with pytest.raises(jlora.LoraError, match="'q' and 'v'.*module_fn"):
        jlora.peft.save(str(tmp_path / "p"), ad)
    assert not (tmp_path / "p").exists()
    jlora.peft.save(str(tmp_path / "p"), ad, module_fn=lambda path, index: path)
    back = jlora.peft.load(str(tmp_path / "p"), params, module_fn=lambda path, index: path)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(ad)):
        np.testing.assert_array_equal(got, want)
