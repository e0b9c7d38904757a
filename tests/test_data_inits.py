"""``jlora.init_from_data``: LoRA-GA against PEFT's on the same tiny Llama and batches, and
the refusals (PEFT from the ``interop`` extra)."""

import jax
import jax.numpy as jnp
import llama
import numpy as np
import pytest

import jlora

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.tuners.lora.config import CordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402
from peft.tuners.lora.loraga import preprocess_loraga  # noqa: E402

HF = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
R = 4


def _hf_base():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**HF, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config)


def _batches():
    rng = np.random.default_rng(3)
    return [rng.integers(0, HF["vocab_size"], (2, 10)) for _ in range(3)]


def _causal_lm_loss(out):
    """transformers' loss with labels = input ids: the mean next-token cross-entropy."""
    logits, ids = out
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def _peft_lora_ga(batches):
    model = _hf_base()
    cfg = peft.LoraConfig(
        r=R,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights="lora_ga",
        lora_ga_config=peft.LoraGAConfig(),
    )

    def train_step():
        for ids in batches:
            model(torch.tensor(ids), labels=torch.tensor(ids)).loss.backward()

    preprocess_loraga(model, cfg, train_step)
    return peft.get_peft_model(model, cfg)


def _aligned(got, want):
    """``got``'s rows flipped to ``want``'s signs (an SVD fixes each direction up to sign)."""
    signs = np.sign(np.sum(got * want, axis=1, keepdims=True))
    return got * signs


def _compare(ad, pm, scan, align_b_alone):
    """Each node's factors against PEFT's (up to sign) and its residual base."""
    state = {k: v.detach().numpy() for k, v in pm.state_dict().items()}
    for path, node in jlora._src.adapter.adapter_nodes(ad).items():
        for layer in range(2 if scan else 1):
            module = llama.hf_module(path, (layer,) if scan else ()).removeprefix("model.")
            pre = f"base_model.model.model.{module}"
            a = np.asarray(node.a[layer] if scan else node.a).T  # (r, in), PEFT's lora_A
            b = np.asarray(node.b[layer] if scan else node.b).T  # (out, r), PEFT's lora_B
            want_a, want_b = (
                state[f"{pre}.lora_A.default.weight"],
                state[f"{pre}.lora_B.default.weight"],
            )
            signs = np.sign(np.sum(a * want_a, axis=1))
            a = a * signs[:, None]
            b = _aligned(b.T, want_b.T).T if align_b_alone else b * signs[None, :]
            np.testing.assert_allclose(a, want_a, atol=1e-3, err_msg=path)
            np.testing.assert_allclose(b, want_b, atol=1e-3, err_msg=path)
            w0 = _hf_base().state_dict()[f"model.{module}.weight"].numpy()
            np.testing.assert_allclose(
                w0 - node.scale * b @ a, state[f"{pre}.base_layer.weight"], atol=1e-3, err_msg=path
            )


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_equals_peft(method):
    """Batches of one sequence each, as PEFT's covariance hook assumes."""
    rng = np.random.default_rng(4)
    batches = [rng.integers(0, HF["vocab_size"], (1, 12)) for _ in range(4)]
    model_t = _hf_base().eval()
    cfg_t = peft.LoraConfig(
        r=R,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=method),
    )
    with torch.no_grad():
        preprocess_corda(
            model_t, cfg_t, run_model=lambda: [model_t(torch.tensor(b)) for b in batches]
        )
    pm = peft.get_peft_model(model_t, cfg_t)
    cfg = llama.config_from_hf(_hf_base().config)
    model, params = llama.Llama(cfg), llama.from_hf(_hf_base().state_dict(), cfg)
    lcfg = jlora.LoraConfig(
        rank=R, alpha=8.0, targets=tuple(TARGETS), init="corda", corda_method=method
    )
    ad, base = jlora.init_from_data(
        jax.random.key(0), params, lcfg, model.apply, [jnp.asarray(b) for b in batches]
    )
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(ad))
    _compare(ad, pm, True, align_b_alone=False)
    ids = jnp.asarray(batches[0])
    np.testing.assert_allclose(
        jlora.apply(model.apply)(base, ad, ids), model.apply(params, ids), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("scan", [True, False])
def test_lora_ga_equals_peft(scan):
    batches = _batches()
    pm = _peft_lora_ga(batches)
    cfg = llama.config_from_hf(_hf_base().config, scan_layers=scan)
    model, params = llama.Llama(cfg), llama.from_hf(_hf_base().state_dict(), cfg)
    fn = lambda p, ids: (model.apply(p, ids), ids)
    lcfg = jlora.LoraConfig(rank=R, alpha=8.0, targets=tuple(TARGETS), init="lora_ga")
    ad, base = jlora.init_from_data(
        jax.random.key(0), params, lcfg, fn, [jnp.asarray(b) for b in batches], loss=_causal_lm_loss
    )
    _compare(ad, pm, scan, align_b_alone=True)
    ids = jnp.asarray(batches[0])
    np.testing.assert_allclose(
        jlora.apply(model.apply)(base, ad, ids), model.apply(params, ids), rtol=1e-4, atol=1e-4
    )


def test_bad_input_names_the_fix():
    params = {"w": jnp.ones((6, 4))}
    fn = lambda p, x: x @ p["w"]
    x = jnp.ones((3, 6))
    cfg = jlora.LoraConfig(rank=1, targets="w", init="lora_ga")
    with pytest.raises(jlora.LoraError, match="must return a scalar"):
        jlora.init_from_data(jax.random.key(0), params, cfg, fn, [x], loss=lambda y: y)
    with pytest.raises(jlora.LoraError, match="non-empty list"):
        jlora.init_from_data(jax.random.key(0), params, cfg, fn, [], loss=jnp.sum)
    with pytest.raises(jlora.LoraError, match="pass loss="):
        jlora.init_from_data(jax.random.key(0), params, cfg, fn, [x])
    with pytest.raises(jlora.LoraError, match="jlora.init_from_data"):
        jlora.init(jax.random.key(0), params, cfg)
    with pytest.raises(jlora.LoraError, match="needs no data"):
        jlora.init_from_data(
            jax.random.key(0), params, jlora.LoraConfig(rank=1, targets="w"), fn, [x]
        )
    table = {"embed": jnp.ones((8, 6))}
    with pytest.raises(jlora.LoraError, match="corda.*no dot_general"):  # a lookup only
        jlora.init_from_data(
            jax.random.key(0),
            table,
            jlora.LoraConfig(rank=1, targets="embed", init="corda"),
            lambda p, i: p["embed"][i],
            [jnp.zeros((3,), jnp.int32)],
        )
    eva = jlora.LoraConfig(rank=1, targets="w", init="eva")
    ad, base = jlora.init_from_data(jax.random.key(0), params, eva, fn, [x * jnp.arange(6.0)[None]])
    assert base is params and ad["w"].a.shape == (6, 1)
