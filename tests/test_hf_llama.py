"""examples/llama.py loads a Hugging Face LlamaForCausalLM and matches its logits."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import llama  # noqa: E402
import numpy as np  # noqa: E402
from llama import Llama, config_from_hf, from_hf, hf_module, init_params  # noqa: E402

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    rope_theta=500.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
)


def hf_model(kv_heads=4, tie=False, seed=0):
    """A random local LlamaForCausalLM (no download), eager attention, eval mode.

    Weights are larger than HF's 0.02 init and the norm scales are not all
    ones, so attention is far from uniform and every tensor matters.
    """
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        **SMALL,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tie,
        initializer_range=0.3,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kv_heads,tie", [(4, False), (2, False), (2, True)])
@pytest.mark.parametrize("scan", [True, False])
def test_logits_match_hf(kv_heads, tie, scan, key):
    model = hf_model(kv_heads, tie)
    assert model.config._attn_implementation == "eager"
    config = config_from_hf(model.config, scan_layers=scan)
    assert (config.kv_heads, config.tie_embeddings, config.rope_theta) == (kv_heads, tie, 500.0)
    params = from_hf(model.state_dict(), config)
    like = init_params(config, key)
    assert jax.tree.structure(params) == jax.tree.structure(like)
    for p, l in zip(jax.tree.leaves(params), jax.tree.leaves(like)):
        assert (p.shape, p.dtype) == (l.shape, l.dtype)
    ids = np.array(jax.random.randint(jax.random.key(1), (2, 10), 0, SMALL["vocab_size"]))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids).long()).logits.numpy()
    logits = jax.jit(Llama(config).apply)(params, jnp.asarray(ids))
    assert logits.shape == (2, 10, SMALL["vocab_size"]) and expected.std() > 0.5
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


def test_from_numpy_dict_and_param_dtype():
    model = hf_model(kv_heads=2)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    config = config_from_hf(model.config.to_dict(), param_dtype=jnp.bfloat16)
    params = from_hf(state, config)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    q = params["params"]["layers"]["self_attn"]["k_proj"]["kernel"]
    assert q.shape == (2, 32, 16)
    np.testing.assert_array_equal(
        np.asarray(q[1], np.float32),
        np.asarray(
            jnp.asarray(state["model.layers.1.self_attn.k_proj.weight"].T, jnp.bfloat16), np.float32
        ),
    )


def test_config_from_old_style_dict():
    """transformers 4 configs keep rope_theta at the top level and rope_scaling None."""
    d = dict(SMALL, num_key_value_heads=None, rope_scaling=None, tie_word_embeddings=True)
    config = config_from_hf(d, scan_layers=False)
    assert (config.rope_theta, config.kv_heads, config.num_layers) == (500.0, 4, 2)
    assert config.tie_embeddings and not config.scan_layers
    with pytest.raises(ValueError, match="Unsupported"):
        config_from_hf(dict(d, rope_scaling={"rope_type": "llama3", "factor": 8.0}))


def test_missing_extra_and_misshaped_keys_raise():
    model = hf_model()
    config = config_from_hf(model.config)
    state = dict(model.state_dict())
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        from_hf(missing, config)
    with pytest.raises(ValueError, match="unexpected.*model.layers.2.mlp.up_proj.weight"):
        from_hf(dict(state, **{"model.layers.2.mlp.up_proj.weight": torch.zeros(48, 32)}), config)
    with pytest.raises(ValueError, match="shape"):
        from_hf(dict(state, **{"model.norm.weight": torch.zeros(33)}), config)


def test_hf_module():
    assert (
        hf_module("params/layers/self_attn/q_proj/kernel", (3,))
        == "model.layers.3.self_attn.q_proj"
    )
    assert hf_module("params/layers_3/mlp/up_proj/kernel", ()) == "model.layers.3.mlp.up_proj"
    assert hf_module("params/lm_head/kernel", ()) == "lm_head"
    assert hf_module("params/embed_tokens/embedding", ()) == "model.embed_tokens"
    assert hf_module("params/norm/weight", ()) == "model.norm"
    assert (
        hf_module("params/layers/input_layernorm/weight", (0,)) == "model.layers.0.input_layernorm"
    )
    with pytest.raises(ValueError):
        hf_module("params/layers/mlp/up_proj/kernel", ())


def test_hf_module_names_every_state_dict_key(key):
    """Every parameter path maps onto a module of the HF model, unscanned and scanned."""
    model = hf_model(kv_heads=2)
    modules = {name for name, _ in model.named_modules()}
    for scan in (True, False):
        config = config_from_hf(model.config, scan_layers=scan)
        flat = jax.tree_util.tree_flatten_with_path(init_params(config, key))[0]
        for path, leaf in flat:
            path = "/".join(str(k.key) for k in path)
            for i in range(leaf.shape[0]) if scan and "/layers/" in path else [None]:
                assert hf_module(path, () if i is None else (i,)) in modules, path


def test_to_hf_is_the_inverse_of_from_hf(key):
    for scan in (True, False):
        cfg = llama.LlamaConfig(scan_layers=scan)
        params = llama.init_params(cfg, key)
        back = llama.from_hf(llama.to_hf(params, cfg), cfg)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
            np.testing.assert_array_equal(a, b)
