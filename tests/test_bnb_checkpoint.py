"""Pre-quantized bitsandbytes 4-bit checkpoints (``jlora.load_bitsandbytes``), against
bitsandbytes itself (the ``interop`` extra): a ``Linear4bit`` state dict saved with
safetensors loads into NF4 leaves whose values are bitsandbytes' own dequantization
(identical), and QLoRA trains on them in torch's ``(out, in)`` layout.

The reference is bitsandbytes' generic ``dequantize_4bit`` (its ``default`` backend, the
documented flattened-block layout). Its CPU kernel agrees where each row is whole blocks;
on a ``(40, 48)`` weight (blocks of 64 across rows) it decodes other values (up to 6e-3
off here), so it is compared only on the layer whose rows are whole blocks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
st = pytest.importorskip("safetensors.torch")

import jlora  # noqa: E402
from conftest import F32, close, randomize  # noqa: E402


def _quantized_net(double_quant: bool, quant_type: str = "nf4"):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 40))
    q = torch.nn.Sequential(
        *[
            bnb.nn.Linear4bit(
                m.in_features,
                m.out_features,
                compute_dtype=torch.float32,
                compress_statistics=double_quant,
                quant_type=quant_type,
            )
            if isinstance(m, torch.nn.Linear)
            else m
            for m in net
        ]
    )
    q.load_state_dict(net.state_dict())
    return q.to("cpu")  # bitsandbytes quantizes on the move to a device


def _saved(tmp_path, net) -> str:
    path = str(tmp_path / "model.safetensors")
    st.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


def _reference(weight):
    """bitsandbytes' generic dequantization (absmax first, as ``F.dequantize_4bit`` does)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    qs = weight.quant_state
    absmax = qs.absmax
    if qs.nested:
        absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return _dequantize_4bit_compute(
        weight.data.reshape(-1), absmax.float(), qs.code, qs.blocksize, qs.shape, qs.dtype
    ).numpy()


def _fn(p, x):
    h = jax.nn.relu(x @ p["0"]["weight"].T + p["0"]["bias"][None])
    return h @ p["2"]["weight"].T + p["2"]["bias"][None]


@pytest.mark.parametrize("double_quant", [True, False])
def test_values_are_bitsandbytes_dequantize_4bit(tmp_path, double_quant):
    net = _quantized_net(double_quant)
    params = jlora.load_bitsandbytes(_saved(tmp_path, net))
    for i in ("0", "2"):
        leaf, layer = params[i]["weight"], net[int(i)]
        assert isinstance(leaf, jlora.NF4) and leaf.shape == tuple(layer.weight.quant_state.shape)
        assert (leaf.absmax2 is not None) == double_quant
        want = _reference(layer.weight)
        np.testing.assert_array_equal(np.asarray(jlora.dequantize(leaf)), want)
        np.testing.assert_array_equal(params[i]["bias"], layer.bias.detach().numpy())
    kernel = bnb.functional.dequantize_4bit(net[0].weight.data, net[0].weight.quant_state)
    np.testing.assert_array_equal(np.asarray(jlora.dequantize(params["0"]["weight"])), kernel)
    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    h = np.maximum(x @ _reference(net[0].weight).T + net[0].bias.detach().numpy(), 0)
    want = h @ _reference(net[2].weight).T + net[2].bias.detach().numpy()
    np.testing.assert_allclose(jlora.apply(_fn)(params, None, x), want, rtol=1e-5, atol=1e-5)


def test_qlora_starts_from_the_prequantized_model(tmp_path, key):
    """init(fn) learns the torch layout; the adapted model equals the merged weights."""
    params = jlora.load_bitsandbytes(_saved(tmp_path, _quantized_net(True)))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 64)).astype(np.float32))
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=("0", "2"))
    ad = randomize(jlora.init(key, params, cfg, _fn, x), key)
    assert ad["0"]["weight"].in_axes == (1,) and ad["0"]["weight"].a.shape == (64, 4)
    close(jax.jit(jlora.apply(_fn))(params, ad, x), _fn(jlora.merge(params, ad), x), F32)
    grads = jax.grad(lambda a: jnp.sum(jlora.apply(_fn)(params, a, x) ** 2))(ad)
    assert all(
        bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads)
    )


def test_fp4_codes_and_missing_entries_are_refused_by_key(tmp_path):
    with pytest.raises(jlora.LoraError, match=r"'0.weight.quant_state.bitsandbytes__fp4'.*nf4"):
        jlora.load_bitsandbytes(_saved(tmp_path, _quantized_net(True, "fp4")))
    tensors = {k: v.numpy() for k, v in _quantized_net(True).state_dict().items()}
    for missing in (
        "2.weight.absmax",
        "2.weight.nested_quant_map",
        "2.weight.quant_state.bitsandbytes__nf4",
    ):
        broken = {k: v for k, v in tensors.items() if k != missing}
        with pytest.raises(jlora.LoraError, match=missing.replace(".", r"\.")):
            jlora.load_bitsandbytes(broken)
    state = json.loads(bytes(tensors["0.weight.quant_state.bitsandbytes__nf4"]).decode())
    state["shape"] = [48, 32]
    bad = dict(
        tensors,
        **{
            "0.weight.quant_state.bitsandbytes__nf4": np.frombuffer(
                json.dumps(state).encode(), np.uint8
            )
        },
    )
    with pytest.raises(jlora.LoraError, match=r"'0.weight' holds .* for shape \(48, 32\)"):
        jlora.load_bitsandbytes(bad)
