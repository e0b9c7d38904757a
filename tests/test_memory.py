"""The memory estimator against the article's table and XLA's memory_analysis()."""

import jax
import jax.numpy as jnp
import llama
import pytest

import jlora
from jlora._src import memory
from jlora._src.cli import main


@pytest.mark.parametrize("method", memory.METHODS)
def test_estimate_reproduces_the_article_table(method):
    article_gb, settings = memory.ARTICLE[method]
    est = memory.estimate(memory.LLAMA_7B, method, **settings, **memory.ARTICLE_TOKENS)
    assert abs(est["total"] / memory.GB - article_gb) < 0.1 * article_gb


def test_shapes():
    assert memory.Shape.from_params(7e9) == memory.LLAMA_7B
    assert abs(memory.LLAMA_7B.params - 6.738e9) < 1e6  # Llama-2 7B's published count
    cfg = llama.LlamaConfig.named("bench")
    params = llama.init_params(cfg, jax.random.key(0))
    assert memory.Shape.from_config(vars(cfg)).params == llama.count_params(params)
    with pytest.raises(ValueError, match="config lacks"):
        memory.Shape.from_config({"hidden_size": 8})
    with pytest.raises(ValueError, match="method='sgd' is not one of"):
        memory.estimate(memory.LLAMA_7B, "sgd")


def test_qlora_base_argument_bytes_at_7b_shapes():
    """XLA's argument bytes of a forward pass over the 7B-shaped base, NF4 vs bf16 (abstract
    shapes: nothing is allocated). Embeddings and lm_head stay bf16, as in bitsandbytes."""
    cfg = llama.LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
    )
    model = llama.Llama(cfg)
    params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    fwd = jax.jit(lambda p, x: jlora.apply(model.apply)(p, {}, x))  # no adapter: the base
    args = lambda p: fwd.lower(p, ids).compile().memory_analysis().argument_size_in_bytes
    ratio = args(jax.eval_shape(jlora.quantize, params)) / args(params)
    assert 0.25 < ratio <= 0.30
    est = (
        memory.estimate(memory.LLAMA_7B, "qlora")["weights"]
        / memory.estimate(memory.LLAMA_7B, "lora")["weights"]
    )
    assert abs(est - ratio) < 0.01


def test_cli_prints_the_table(capsys):
    assert main(["memory", "--params", "7e9", "--article"]) == 0
    out = capsys.readouterr().out
    assert "| qlora (article: ~6 GB, checkpointed) | 3.93 |" in out


def test_cli_reads_a_config_file(capsys):
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "bench_config.json")
    assert main(["memory", "--config", path, "--batch", "4", "--seq", "256"]) == 0
    out = capsys.readouterr().out
    cfg = llama.LlamaConfig.named("bench")
    lora = memory.estimate(memory.Shape.from_config(vars(cfg)), "lora", batch=4, seq=256)
    assert f"| lora | {lora['weights'] / 2**20:.2f} |" in out and "total MB" in out


@pytest.mark.parametrize("qtype", memory.QTYPES)
def test_a_qlora_row_per_format_matches_xla(qtype, capsys):
    """Each registered format is a ``jlora memory`` row whose saving over the bf16 base is
    what XLA's argument bytes of a forward pass over the base quantized to it save (the
    example's bench model, abstract shapes: nothing allocated), to 1%."""
    cfg = llama.LlamaConfig.named("bench")
    cfg = llama.LlamaConfig(**{**vars(cfg), "dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16})
    model = llama.Llama(cfg)
    params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    fwd = jax.jit(lambda p, x: jlora.apply(model.apply)(p, {}, x))
    xla = lambda p: fwd.lower(p, ids).compile().memory_analysis().argument_size_in_bytes
    saved = xla(params) - xla(jax.eval_shape(lambda p: jlora.quantize(p, qtype=qtype), params))
    shape = memory.Shape.from_config(vars(cfg))
    est = memory.estimate(shape, "lora")["weights"]
    est -= memory.estimate(shape, "qlora", qtype=qtype)["weights"]
    assert abs(est / saved - 1) < 0.01, (est, saved)
    assert main(["memory", "--params", "7e9"]) == 0
    label = "qlora" if qtype == "nf4" else f"qlora {qtype}"
    assert f"| {label} | " in capsys.readouterr().out


#: gpt-oss-20b's config.json where it differs from transformers' default (gpt-oss-120b).
GPT_OSS_20B = dict(num_hidden_layers=24, num_local_experts=32)


@pytest.mark.parametrize("family", ["GptOss", "Mixtral"])
def test_a_mixture_of_experts_counts_like_transformers(family):
    """A MoE config's ``Shape`` counts what transformers builds from it (biases and
    attention sinks aside: gpt-oss's, 0.03% of its 20B), and the published sizes of
    gpt-oss-20b (20.91B) and gpt-oss-120b (116.83B, transformers' default config)."""
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, family + "Config")(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        head_dim=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = getattr(transformers, family + "ForCausalLM")(config)
    count = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(("bias", "sinks")))
    shape = memory.Shape.from_config(config.to_dict())
    assert (shape.experts, shape.experts_per_tok, shape.head_dim) == (4, 2, 16)
    assert shape.params == count
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        memory.Shape.from_config({**config.to_dict(), "num_experts_per_tok": None})
    moe_width = {**config.to_dict(), "intermediate_size": 4096, "moe_intermediate_size": 48}
    assert memory.Shape.from_config(moe_width).params == count  # (Qwen-MoE's expert key)
    if family == "GptOss":
        for published, sizes in ((20.91e9, GPT_OSS_20B), (116.83e9, {})):
            big = memory.Shape.from_config(transformers.GptOssConfig(**sizes).to_dict())
            assert abs(big.params / published - 1) < 0.005
