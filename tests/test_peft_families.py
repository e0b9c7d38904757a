"""PEFT files of real model families against the real PEFT and transformers, fp32.

The JAX models are plain ports that read the torch state dict as it is
(``tests/torch_models.py``): Llama on torch's ``(out, in)`` weights (``x @ W.T``),
GPT-2's ``Conv1D`` ``(in, out)`` (PEFT's ``fan_in_fan_out``), Mixtral's fused experts
(PEFT's ``target_parameters``). Each adapter has random ``B`` (so it moves the logits),
and jlora's logits must equal PEFT's to 1e-4, both directions.
"""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import torch_models as tm  # noqa: E402

import jlora  # noqa: E402
from conftest import randomize  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)
LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    attn_implementation="eager",
)
IDS = np.random.default_rng(1).integers(0, 64, (2, 9))


def _llama(tied=False):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**LLAMA, tie_word_embeddings=tied)
    ).eval()


def _mixtral():
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            **{**LLAMA, "intermediate_size": 24}, num_local_experts=4, num_experts_per_tok=2
        )
    ).eval()


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=64,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()


def _peft(base, seed=0, **cfg):
    """A PEFT model whose lora_B, lora_embedding_A (PEFT starts an embedding's A at zero)
    and trained biases are random: the adapter acts."""
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, **cfg)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and (
                "lora_B" in name or "lora_embedding_A" in name or name.endswith("bias")
            ):
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return pm


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def _jax(base, model=tm.llama):
    c = base.config
    drop = ("lm_head.weight",) if model is tm.gpt2 else ()
    return (lambda p, ids: model(p, ids, c)), tm.tree(base.state_dict(), drop)


def _moves(pm, base):
    """The adapter changes PEFT's logits by more than the tolerance (the test has teeth)."""
    assert np.abs(_torch_logits(pm) - _torch_logits(base)).max() > 1e-2


def test_torch_layout_llama_loads_right_with_fn(tmp_path):
    """``x @ W.T`` on (out, in) weights: with fn the axes are learned, logits and merged
    weights equal PEFT's."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    pm = _peft(_llama(), target_modules=targets)
    _moves(pm, _llama())
    pm.save_pretrained(tmp_path)
    fn, params = _jax(_llama())
    ad = jlora.peft.load(str(tmp_path), params, fn, IDS)
    q = ad["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"]
    assert (q.in_axes, q.out_axes, q.axes_from) == ((1,), (0,), "fn")
    np.testing.assert_allclose(jax.jit(jlora.apply(fn))(params, ad, IDS), _torch_logits(pm), **TOL)
    assert set(sum(jlora.explain(fn, params, ad, IDS).values(), [])) == {"factored"}
    merged = jlora.merge(params, ad)
    want = tm.tree(pm.merge_and_unload().state_dict())
    for path, leaf in jax.tree_util.tree_flatten_with_path(merged)[0]:
        np.testing.assert_allclose(leaf, _at(want, path), rtol=1e-5, atol=1e-6)


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_torch_layout_without_fn_is_refused_with_the_fix(tmp_path):
    """No fn: a non-square kernel is refused at load, a square one (which fits either
    way) loads with its layout assumed and apply refuses the ``x @ W.T`` use."""
    fn, params = _jax(_llama())
    _peft(_llama(), target_modules=["q_proj", "up_proj"]).save_pretrained(tmp_path / "mixed")
    with pytest.raises(
        ValueError,
        match=r"up_proj.*fit it transposed.*peft\.load\(path, "
        r"params, fn, \*example_args\)",
    ):
        jlora.peft.load(str(tmp_path / "mixed"), params)
    _peft(_llama(), target_modules=["q_proj", "o_proj"]).save_pretrained(tmp_path / "square")
    ad = jlora.peft.load(str(tmp_path / "square"), params)
    assert ad["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"].axes_from == "assumed"
    with pytest.raises(ValueError, match=r"q_proj.*transposed.*peft\.load\(path, params, fn"):
        jlora.apply(fn)(params, ad, IDS)
    with pytest.raises(ValueError, match=r"peft\.load\(path, params, fn"):
        jlora.explain(fn, params, ad, IDS)


def test_jlora_adapter_on_torch_layout_loads_into_peft(tmp_path, key):
    fn, params = _jax(_llama())
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj"))
    ad = randomize(jlora.init(key, params, cfg, fn, IDS), key)
    jlora.peft.save(str(tmp_path), ad)
    back = peft.PeftModel.from_pretrained(_llama(), str(tmp_path)).eval()
    np.testing.assert_allclose(_torch_logits(back), jlora.apply(fn)(params, ad, IDS), **TOL)


def test_embed_tokens_and_lm_head_adapters_with_their_base_layers(tmp_path):
    """PEFT saves the base layers of targeted embedding layers; they are read and checked
    against params (a different base is refused), and the logits equal PEFT's, both ways."""
    pm = _peft(_llama(), target_modules=["q_proj", "embed_tokens", "lm_head"])
    pm.save_pretrained(tmp_path)
    keys = json.loads(open(tmp_path / "adapter_config.json").read())["target_modules"]
    assert "lm_head" in keys
    fn, params = _jax(_llama())
    ad = jlora.peft.load(str(tmp_path), params, fn, IDS)
    np.testing.assert_allclose(jlora.apply(fn)(params, ad, IDS), _torch_logits(pm), **TOL)
    assert ad["lm_head"]["weight"].in_axes == (1,)
    assert ad["model"]["embed_tokens"]["weight"].axes_from == "lookup"  # PEFT: lookups only
    other = jax.tree.map(lambda x: x, params)
    other["lm_head"]["weight"] = params["lm_head"]["weight"] * 1.01
    with pytest.raises(ValueError, match=r"lm_head\.base_layer\.weight.*differs"):
        jlora.peft.load(str(tmp_path), other, fn, IDS)
    mine = randomize(
        jlora.init(
            jax.random.key(3),
            params,
            jlora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "embed_tokens", "lm_head")),
            fn,
            IDS,
        ),
        jax.random.key(4),
    )
    jlora.peft.save(str(tmp_path / "jlora"), mine)  # and back: PEFT reads jlora's file
    back = peft.PeftModel.from_pretrained(_llama(), str(tmp_path / "jlora")).eval()
    np.testing.assert_allclose(_torch_logits(back), jlora.apply(fn)(params, mine, IDS), **TOL)
    bad = lambda p, idx: "x." + jlora.peft.default_module(p, idx)
    with pytest.raises(
        ValueError,
        match=r"match no parameter.*gives 'lm_head/weight' -> "
        r"'base_model\.model\.x\.lm_head'",
    ):
        jlora.peft.load(str(tmp_path), params, fn, IDS, module_fn=bad)


def test_gpt2_fan_in_fan_out_both_directions(tmp_path, key):
    """GPT-2's Conv1D keeps (in, out): PEFT sets fan_in_fan_out; the factors are the same
    and load into the JAX port (with and without fn), and merge like PEFT's."""
    pm = _peft(_gpt2(), target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    _moves(pm, _gpt2())
    pm.save_pretrained(tmp_path / "peft")
    fn, params = _jax(_gpt2(), tm.gpt2)
    for ad in (
        jlora.peft.load(str(tmp_path / "peft"), params),
        jlora.peft.load(str(tmp_path / "peft"), params, fn, IDS),
    ):
        np.testing.assert_allclose(jlora.apply(fn)(params, ad, IDS), _torch_logits(pm), **TOL)
    want = tm.tree(pm.merge_and_unload().state_dict())
    np.testing.assert_allclose(
        _at(
            jlora.merge(params, ad),
            [jax.tree_util.DictKey(k) for k in "transformer.h.1.attn.c_attn.weight".split(".")],
        ),
        want["transformer"]["h"]["1"]["attn"]["c_attn"]["weight"],
        rtol=1e-5,
        atol=1e-6,
    )
    mine = randomize(
        jlora.init(
            key, params, jlora.LoraConfig(rank=4, alpha=8.0, targets=("c_attn", "c_fc")), fn, IDS
        ),
        key,
    )
    jlora.peft.save(str(tmp_path / "jlora"), mine, fan_in_fan_out=True)
    assert (
        json.loads(open(tmp_path / "jlora" / "adapter_config.json").read())["fan_in_fan_out"]
        is True
    )
    back = peft.PeftModel.from_pretrained(_gpt2(), str(tmp_path / "jlora")).eval()
    np.testing.assert_allclose(_torch_logits(back), jlora.apply(fn)(params, mine, IDS), **TOL)


@pytest.mark.parametrize("bias", [dict(bias="all"), dict(bias="lora_only"), dict(lora_bias=True)])
def test_trained_biases_load(tmp_path, bias):
    """``bias="all"``/``"lora_only"`` (trained biases) and ``lora_bias`` (a bias on B,
    scaled with the low-rank path): folded into FullNodes on the bias leaves, which
    save back as trained biases PEFT loads with the same logits."""
    pm = _peft(_gpt2(), target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, **bias)
    pm.save_pretrained(tmp_path / "peft")
    fn, params = _jax(_gpt2(), tm.gpt2)
    ad = jlora.peft.load(str(tmp_path / "peft"), params, module_fn=jlora.peft.torch_module)
    assert isinstance(
        ad["transformer"]["h"]["0"]["attn"]["c_attn"]["bias"], jlora._src.adapter.FullNode
    )
    np.testing.assert_allclose(jlora.apply(fn)(params, ad, IDS), _torch_logits(pm), **TOL)
    jlora.peft.save(
        str(tmp_path / "back"), ad, module_fn=jlora.peft.torch_module, fan_in_fan_out=True
    )  # B's bias folded in: written as a trained bias
    back = peft.PeftModel.from_pretrained(_gpt2(), str(tmp_path / "back")).eval()
    np.testing.assert_allclose(_torch_logits(back), _torch_logits(pm), **TOL)


def test_eva_files_load_as_plain_lora(tmp_path):
    """EVA only chose A's start from data: the base is untouched, the file is plain LoRA."""
    pm = _peft(_llama(), target_modules=["q_proj"])
    pm.save_pretrained(tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg_path.write_text(
        json.dumps({**json.loads(cfg_path.read_text()), "init_lora_weights": "eva"})
    )
    fn, params = _jax(_llama())
    np.testing.assert_allclose(
        jlora.apply(fn)(params, jlora.peft.load(str(tmp_path), params, fn, IDS), IDS),
        _torch_logits(pm),
        **TOL,
    )


def test_moe_target_parameters_both_directions(tmp_path, key):
    """Mixtral's fused (E, out, in) experts through ragged_dot: PEFT's target_parameters
    load factored (expert axis stacked), and a jlora adapter saves as them."""
    cfg = dict(
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    pm = _peft(_mixtral(), **cfg)
    _moves(pm, _mixtral())
    pm.save_pretrained(tmp_path / "peft")
    fn, params = _jax(_mixtral())
    with pytest.raises(ValueError, match=r"peft\.load\(path, params, fn"):
        jlora.peft.load(str(tmp_path / "peft"), params)  # (E, out, in): needs the model
    ad = jlora.peft.load(str(tmp_path / "peft"), params, fn, IDS)
    up = ad["model"]["layers"]["0"]["mlp"]["experts"]["gate_up_proj"]
    assert (up.stack_axes, up.in_axes, up.out_axes, up.a.shape) == ((0,), (2,), (1,), (4, 32, 4))
    np.testing.assert_allclose(jlora.apply(fn)(params, ad, IDS), _torch_logits(pm), **TOL)
    uses = jlora.explain(fn, params, ad, IDS)
    assert uses["model/layers/0/mlp/experts/down_proj"] == ["factored"]
    mine = randomize(
        jlora.init(
            key,
            params,
            jlora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "gate_up_proj", "down_proj")),
            fn,
            IDS,
        ),
        key,
    )
    jlora.peft.save(str(tmp_path / "jlora"), mine, parameters=("gate_up_proj", "down_proj"))
    back = peft.PeftModel.from_pretrained(_mixtral(), str(tmp_path / "jlora")).eval()
    np.testing.assert_allclose(_torch_logits(back), jlora.apply(fn)(params, mine, IDS), **TOL)


@pytest.mark.parametrize("tying", [False, True])
def test_tied_head_follows_ensure_weight_tying(tmp_path, tying):
    """A tied model, one table for the lookup and ``x @ E.T``. PEFT applies an embedding
    adapter at the lookup only unless ``ensure_weight_tying`` (then at the head too, with
    a copy of the factors under ``lm_head``): jlora gives PEFT's logits, or refuses the
    tied use and an untied copy of the head gives them."""
    pm = _peft(
        _llama(tied=True), target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=tying
    )
    _moves(pm, _llama(tied=True))
    pm.save_pretrained(tmp_path)
    fn, untied = _jax(_llama(tied=True))  # the state dict holds lm_head.weight too
    tied = {k: v for k, v in untied.items() if k != "lm_head"}
    ad = jlora.peft.load(str(tmp_path), tied, fn, IDS)
    if tying:
        np.testing.assert_allclose(jlora.apply(fn)(tied, ad, IDS), _torch_logits(pm), **TOL)
        return
    with pytest.raises(ValueError, match="ensure_weight_tying=False.*untied lm_head"):
        jlora.apply(fn)(tied, ad, IDS)
    ad = jlora.peft.load(str(tmp_path), untied, fn, IDS)
    np.testing.assert_allclose(jlora.apply(fn)(untied, ad, IDS), _torch_logits(pm), **TOL)
