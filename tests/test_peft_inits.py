"""Inits that move part of the base into the factors (OLoRA, PiSSA), against the real PEFT.

OLoRA (PEFT's ``olora_init``: QR of the torch-layout weight) gives PEFT's factors and
residual base on the same weight (fp32, 1e-5). An adapter trained on the residual is
saved for PEFT as plain LoRA for the *original* base (``initial=``: ``[A | A0]``,
``[B; -B0]``, PEFT's ``path_initial_model_for_weight_conversion``), and PEFT's outputs on
the original net equal jlora's on the residual (1e-4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jlora  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 6))


def _params(net):
    return {str(i): {"kernel": jnp.asarray(net[i].weight.detach().numpy().T),
                     "bias": jnp.asarray(net[i].bias.detach().numpy())} for i in (0, 2)}


def fn(p, x):
    h = jax.nn.relu(x @ p["0"]["kernel"] + p["0"]["bias"][None])
    return h @ p["2"]["kernel"] + p["2"]["bias"][None]


def _module(path, index=()):
    return path.split("/")[0]


X = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)


def test_olora_init_matches_peft():
    pm = peft.get_peft_model(_net(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"],
                                                     init_lora_weights="olora"))
    params = _params(_net())
    cfg = jlora.LoraConfig(rank=3, alpha=6.0, targets=("0", "2"), init="olora")
    ad, residual = jlora.init(jax.random.key(0), params, cfg)
    for i in ("0", "2"):
        layer = pm.base_model.model[int(i)]
        node = ad[i]["kernel"]
        np.testing.assert_allclose(node.a, layer.lora_A["default"].weight.detach().numpy().T,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(node.b, layer.lora_B["default"].weight.detach().numpy().T,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(residual[i]["kernel"],
                                   layer.base_layer.weight.detach().numpy().T, rtol=1e-5,
                                   atol=1e-5)
    # the adapted residual is the original model
    np.testing.assert_allclose(jlora.apply(fn)(residual, ad, X), fn(params, X), **TOL)


@pytest.mark.parametrize("init", ["olora", "pissa"])
@pytest.mark.parametrize("rslora", [False, True])
def test_adapters_on_a_residual_base_save_as_plain_lora_for_peft(tmp_path, init, rslora):
    params = _params(_net())
    cfg = jlora.LoraConfig(rank=3, alpha=6.0, targets=("0", "2"), init=init, rslora=rslora)
    initial, residual = jlora.init(jax.random.key(0), params, cfg)
    trained = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(1), v.shape),
                           initial)  # as if trained: the factors moved
    want = jlora.apply(fn)(residual, trained, X)
    jlora.peft.save(str(tmp_path), trained, module_fn=_module, initial=initial)
    pm = peft.PeftModel.from_pretrained(_net(), str(tmp_path)).eval()
    with torch.no_grad():
        got = pm(torch.tensor(X)).numpy()
    np.testing.assert_allclose(got, want, **TOL)
    back = jlora.peft.load(str(tmp_path), params, module_fn=_module)  # on the original base
    assert back["0"]["kernel"].rank == 6
    np.testing.assert_allclose(jlora.apply(fn)(params, back, X), want, **TOL)
