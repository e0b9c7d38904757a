"""Quantized checkpoints as models ship them (gpt-oss MXFP4, block FP8, bitsandbytes NF4)
read by ``jlora.load_quantized`` with their bytes kept: each dequantizes to what
transformers' own reference dequantization gives, bit for bit. The files are written
with torch and safetensors in the layouts those functions read."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
finegrained_fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")


def _gpt_oss_experts(seed, experts=3, out=64, groups=4):
    """Random MXFP4 expert tensors in gpt-oss's layout: every code and scale exponent
    (around 127, as trained weights have) equally likely."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, out, groups, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 132, (experts, out, groups), generator=g, dtype=torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_mxfp4_equals_transformers_bit_for_bit(tmp_path, dtype):
    blocks, scales = _gpt_oss_experts(0)
    path = tmp_path / "model.safetensors"
    key = "model.layers.0.mlp.experts.gate_up_proj"
    safetensors_torch.save_file(
        {key + "_blocks": blocks, key + "_scales": scales, "model.norm.weight": torch.ones(8)},
        str(path),
    )
    jdtype = jnp.float32 if dtype == torch.float32 else jnp.bfloat16
    tree = jlora.load_quantized(path, compute_dtype=jdtype)
    leaf = tree["model"]["layers"]["0"]["mlp"]["experts"]["gate_up_proj"]
    assert leaf.qtype == "mxfp4" and leaf.shape == (3, 128, 64)
    assert leaf.nbytes == blocks.numel() + scales.numel()  # the stored bytes, nothing more
    want = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=dtype).float().numpy()
    got = np.asarray(jlora.dequantize(leaf), np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(tree["model"]["norm"]["weight"], np.ones(8))


def _block_fp8(seed, out=300, inp=200):
    """A float32 weight quantized as DeepSeek-V3 does (absmax / 448 per 128 x 128 block,
    partial blocks at the edges), in torch's ``(out, in)`` layout."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.logspace(-2, 1, out)[:, None]
    rows, cols = -(-out // 128), -(-inp // 128)
    pad = torch.nn.functional.pad(w, (0, cols * 128 - inp, 0, rows * 128 - out))
    amax = pad.abs().reshape(rows, 128, cols, 128).amax(dim=(1, 3))
    scale = amax / 448.0
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:out, :inp]
    return (w / full).to(torch.float8_e4m3fn), scale


def test_block_fp8_equals_transformers_bit_for_bit(tmp_path):
    weight, scale = _block_fp8(1)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(
        {"layers.0.q_proj.weight": weight, "layers.0.q_proj.weight_scale_inv": scale}, str(path)
    )
    leaf = jlora.load_quantized(path, compute_dtype=jnp.float32)["layers"]["0"]["q_proj"]["weight"]
    assert leaf.qtype == "fp8_block" and leaf.shape == (300, 200)
    assert leaf.nbytes == weight.numel() + 4 * scale.numel()
    want = finegrained_fp8._dequantize_fp8_weight(weight, scale, [128, 128], torch.float32)
    got = np.asarray(jlora.dequantize(leaf))
    np.testing.assert_array_equal(got.view(np.uint32), want.numpy().view(np.uint32))


def test_lora_on_a_loaded_base_equals_lora_on_its_dequantized_copy(key, tmp_path):
    """Both layouts in one checkpoint (the directory form), used as a model would: the
    MXFP4 experts as ``x @ W[e]``, the FP8 projection as ``x @ W.T``."""
    blocks, scales = _gpt_oss_experts(2, experts=2, out=32, groups=2)
    weight, scale = _block_fp8(3, out=48, inp=32)
    safetensors_torch.save_file(
        {"experts_blocks": blocks, "experts_scales": scales},
        str(tmp_path / "model-00001.safetensors"),
    )
    safetensors_torch.save_file(
        {"proj.weight": weight, "proj.weight_scale_inv": scale},
        str(tmp_path / "model-00002.safetensors"),
    )
    base = jlora.load_quantized(tmp_path, compute_dtype=jnp.float32)

    def fn(p, x):
        h = jnp.einsum("bi,eio->beo", x, p["experts"]).sum(1)  # (b, 32)
        return h @ p["proj"]["weight"].T

    x = jax.random.normal(key, (4, 64))
    ad = jlora.init(key, base, jlora.LoraConfig(rank=4, targets=("experts", "proj")), fn, x)
    ad = jax.tree.map(lambda v: v + 0.01, ad)
    deq = jlora.dequantize(base)
    f = jax.jit(jlora.apply(fn))
    np.testing.assert_allclose(f(base, ad, x), f(deq, ad, x), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda a, p=p: f(p, a, x).sum())(ad) for p in (base, deq)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert set(sum(jlora.explain(fn, base, ad, x).values(), [])) == {"factored"}


def test_bitsandbytes_files_load_through_load_quantized_too():
    w = np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)
    q = jlora.quantize({"w": w}, double_quant=False, compute_dtype=jnp.float32)["w"]
    state = {
        "fc.weight": np.asarray(q.packed)[:, None],
        "fc.weight.absmax": np.asarray(q.absmax),
        "fc.weight.quant_map": np.asarray(jlora._src.numerics.quant.NF4_CODE),
        "fc.weight.quant_state.bitsandbytes__nf4": np.frombuffer(
            json.dumps(
                {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, 64]}
            ).encode(),
            np.uint8,
        ),
    }
    for load in (jlora.load_quantized, jlora.load_bitsandbytes):
        leaf = load(state)["fc"]["weight"]
        np.testing.assert_array_equal(jlora.dequantize(leaf), jlora.dequantize(q))


def test_each_check_names_the_key():
    blocks, scales = (t.numpy() for t in _gpt_oss_experts(4, experts=1, out=8, groups=1))
    weight, scale = _block_fp8(5, out=16, inp=16)
    weight = weight.view(torch.uint8).numpy().view(jnp.float8_e4m3fn)
    scale = scale.numpy()
    cases = [
        ({"e_blocks": blocks}, "'e_blocks' needs 'e_scales'"),
        ({"e_blocks": blocks, "e_scales": scales[..., :0]}, "gpt-oss MXFP4: 'e_blocks'"),
        ({"e_blocks": blocks[..., :8], "e_scales": scales}, "gpt-oss MXFP4: 'e_blocks'"),
        ({"p.weight_scale_inv": scale}, "'p.weight_scale_inv' needs 'p.weight'"),
        ({"p.weight": weight, "p.weight_scale_inv": np.ones((2, 2), np.float32)}, "'p.weight'"),
        (
            {"p.weight": weight.astype(np.float32), "p.weight_scale_inv": scale},
            "block FP8: 'p.weight' float32",
        ),
        ({"p.weight": weight}, "'p.weight' looks quantized"),
        ({"p.weight": weight.astype(np.float32), "p.weight_scale": scale}, "'p.weight_scale'"),
    ]
    for state, match in cases:
        with pytest.raises(jlora.LoraError, match=match):
            jlora.load_quantized(state)


def test_a_file_is_read_one_tensor_at_a_time(tmp_path, monkeypatch):
    """The reader maps each tensor's bytes when it is used: loading a file whose tensors
    are each read through ``numpy.memmap`` (counted here) never reads one twice."""
    from jlora._src.io import tensors as reader

    weight, scale = _block_fp8(6, out=128, inp=128)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(
        {"a.weight": weight, "a.weight_scale_inv": scale, "b": torch.ones(4)}, str(path)
    )
    opened = []
    real = reader.np.memmap

    def counting(*args, **kw):
        opened.append(kw.get("offset"))
        return real(*args, **kw)

    monkeypatch.setattr(reader.np, "memmap", counting)
    jlora.load_quantized(path)
    assert len(opened) == len(set(opened)) == 3


GPT_OSS = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=64,
    head_dim=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=4,
    max_position_embeddings=64,
    rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    attn_implementation="eager",
)
EXPERTS = ("gate_up_proj", "down_proj")


def _to_mxfp4(w):
    """gpt-oss's ``*_blocks``, ``*_scales`` for experts ``w (E, in, out)``, float64 numpy
    throughout: per 32 inputs of an output row the smallest power-of-two scale that keeps
    the block within E2M1's +-6, each element rounded to nearest-even E2M1 (ml_dtypes), two
    codes a byte, the even element in the low nibble (what ``convert_moe_packed_tensors``
    reads)."""
    import ml_dtypes

    rows = np.swapaxes(np.asarray(w, np.float64), 1, 2)  # (E, out, in)
    blocks = rows.reshape(*rows.shape[:2], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    exp = np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)).clip(-127, 127)
    codes = (blocks / 2.0**exp).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x0F
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return torch.from_numpy(packed.astype(np.uint8)), torch.from_numpy(
        (exp[..., 0] + 127).astype(np.uint8)
    )


def test_gpt_oss_on_its_mxfp4_experts_gives_peft_logits(tmp_path):
    """A tiny ``GptOssForCausalLM`` from a config, its experts stored as gpt-oss ships them
    (MXFP4 ``*_blocks``/``*_scales``) and the model run on their dequantized values
    (transformers' own ``convert_moe_packed_tensors``). A PEFT adapter on its attention
    (``target_modules``) and experts (``target_parameters``), trained 5 Adam steps in
    torch, loads onto the MXFP4 base from ``load_quantized``: jlora's logits (the JAX port
    in ``tests/torch_models.py``, experts by ``ragged_dot``) equal PEFT's to 1e-4, every
    use factored, the experts kept as their stored bytes."""
    import peft
    import torch_models as tm
    import transformers

    torch.manual_seed(0)
    config = transformers.GptOssConfig(**GPT_OSS)
    model = transformers.GptOssForCausalLM(config).eval()
    state, stored = dict(model.state_dict()), {}
    with torch.no_grad():
        for name in [k for k in state if k.endswith(EXPERTS)]:
            blocks, scales = _to_mxfp4(state.pop(name))
            stored |= {name + "_blocks": blocks, name + "_scales": scales}
            deq = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            model.get_parameter(name).copy_(deq)
    tensors = {k: v.contiguous() for k, v in (state | stored).items()}
    safetensors_torch.save_file(tensors, str(tmp_path / "model.safetensors"))
    ids = torch.tensor(np.random.default_rng(1).integers(0, 64, (2, 9)))
    with torch.no_grad():
        base_logits = model(ids).logits.numpy()
    pm = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=[f"mlp.experts.{n}" for n in EXPERTS],
        ),
    )
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        pm(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval().save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = pm(ids).logits.numpy()
    assert np.abs(want - base_logits).max() > 1e-2  # the adapter moves the logits

    base = jlora.load_quantized(tmp_path, compute_dtype=jnp.float32)
    experts = base["model"]["layers"]["0"]["mlp"]["experts"]
    assert experts["gate_up_proj"].qtype == "mxfp4"
    assert experts["gate_up_proj"].shape == (4, 64, 128)
    fn = lambda p, ids: tm.gpt_oss(p, ids, config)
    deq = jax.jit(fn)(jlora.dequantize(base), ids.numpy())
    np.testing.assert_allclose(deq, base_logits, rtol=1e-4, atol=1e-4)  # the port is right
    ad = jlora.peft.load(str(tmp_path / "peft"), base, fn, ids.numpy())
    got = jax.jit(jlora.apply(fn))(base, ad, ids.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    uses = jlora.explain(fn, base, ad, ids.numpy())
    assert len(uses) == 2 * (4 + 2) and set(sum(uses.values(), [])) == {"factored"}
