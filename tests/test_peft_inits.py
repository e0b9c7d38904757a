"""Inits that move part of the base into the factors (OLoRA, PiSSA), against the real PEFT.

OLoRA (PEFT's ``olora_init``: QR of the torch-layout weight) gives PEFT's factors and
residual base on the same weight (fp32, 1e-5). An adapter trained on the residual is
saved for PEFT as plain LoRA for the *original* base (``initial=``: ``[A | A0]``,
``[B; -B0]``, PEFT's ``path_initial_model_for_weight_conversion``), and PEFT's outputs on
the original net equal jlora's on the residual (1e-4). EVA gives PEFT's ranks and, on
inputs with few strong directions (where PEFT's incremental PCA is exact), its
components (1e-3, up to sign).
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
    return {
        str(i): {
            "kernel": jnp.asarray(net[i].weight.detach().numpy().T),
            "bias": jnp.asarray(net[i].bias.detach().numpy()),
        }
        for i in (0, 2)
    }


def fn(p, x):
    h = jax.nn.relu(x @ p["0"]["kernel"] + p["0"]["bias"][None])
    return h @ p["2"]["kernel"] + p["2"]["bias"][None]


def _module(path, index=()):
    return path.split("/")[0]


X = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)


def test_olora_init_matches_peft():
    pm = peft.get_peft_model(
        _net(),
        peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], init_lora_weights="olora"),
    )
    params = _params(_net())
    cfg = jlora.LoraConfig(rank=3, alpha=6.0, targets=("0", "2"), init="olora")
    ad, residual = jlora.init_with_base(jax.random.key(0), params, cfg)
    for i in ("0", "2"):
        layer = pm.base_model.model[int(i)]
        node = ad[i]["kernel"]
        np.testing.assert_allclose(
            node.a, layer.lora_A["default"].weight.detach().numpy().T, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            node.b, layer.lora_B["default"].weight.detach().numpy().T, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            residual[i]["kernel"], layer.base_layer.weight.detach().numpy().T, rtol=1e-5, atol=1e-5
        )
    # the adapted residual is the original model
    np.testing.assert_allclose(jlora.apply(fn)(residual, ad, X), fn(params, X), **TOL)


@pytest.mark.parametrize("init", ["olora", "pissa"])
@pytest.mark.parametrize("rslora", [False, True])
def test_adapters_on_a_residual_base_save_as_plain_lora_for_peft(tmp_path, init, rslora):
    params = _params(_net())
    cfg = jlora.LoraConfig(rank=3, alpha=6.0, targets=("0", "2"), init=init, rslora=rslora)
    initial, residual = jlora.init_with_base(jax.random.key(0), params, cfg)
    trained = jax.tree.map(
        lambda v: v + 0.05 * jax.random.normal(jax.random.key(1), v.shape), initial
    )  # as if trained: the factors moved
    want = jlora.apply(fn)(residual, trained, X)
    jlora.peft.save(str(tmp_path), trained, module_fn=_module, initial=initial)
    pm = peft.PeftModel.from_pretrained(_net(), str(tmp_path)).eval()
    with torch.no_grad():
        got = pm(torch.tensor(X)).numpy()
    np.testing.assert_allclose(got, want, **TOL)
    back = jlora.peft.load(str(tmp_path), params, module_fn=_module)  # on the original base
    assert back["0"]["kernel"].rank == 6
    np.testing.assert_allclose(jlora.apply(fn)(params, back, X), want, **TOL)


class _TwoInputs(torch.nn.Module):
    """``(tanh(q(x)), u(z))``: two targets with inputs of different spectra."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.u = torch.nn.Linear(8, 6), torch.nn.Linear(6, 5)

    def forward(self, x, z):
        return torch.tanh(self.q(x)), self.u(z)


def _low_rank_rows(seed, n, spectrum, dim):
    """Rows with exactly ``len(spectrum)`` strong directions (PEFT's incremental PCA keeps
    only its top components between batches, so it is exact only on such data)."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:, : len(spectrum)]
    rows = rng.normal(size=(n, len(spectrum))) * spectrum @ q.T + 1e-4 * rng.normal(size=(n, dim))
    return (rows + 0.3).astype(np.float32)


def test_eva_matches_peft_components_and_ranks():
    from peft.tuners.lora.eva import get_eva_state_dict

    net = _TwoInputs()
    x, z = _low_rank_rows(0, 64, [5.0, 4.5, 4.0], 8), _low_rank_rows(1, 64, [3.0, 0.5], 6)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q", "u"],
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=2.0),
    )
    batches = [(torch.from_numpy(x), torch.from_numpy(z))] * 4
    want = get_eva_state_dict(
        net,
        batches,
        config,
        forward_fn=lambda m, b: m(*b),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )
    params = {
        k: {
            "kernel": jnp.asarray(getattr(net, k).weight.detach().numpy().T),
            "bias": jnp.asarray(getattr(net, k).bias.detach().numpy()),
        }
        for k in "qu"
    }
    fn = lambda p, x, z: (
        jnp.tanh(x @ p["q"]["kernel"] + p["q"]["bias"][None]),
        z @ p["u"]["kernel"] + p["u"]["bias"][None],
    )
    ad = jlora.init_eva(
        jax.random.key(0),
        params,
        jlora.LoraConfig(rank=2, alpha=4.0, targets=("q", "u")),
        fn,
        [(x, z)],
        rho=2.0,
    )
    assert {k: v.shape[0] for k, v in want.items()} == {"q": 3, "u": 1}
    for k, comps in want.items():
        node = ad[k]["kernel"]
        assert node.rank == comps.shape[0] and node.alpha == pytest.approx(2.0 * node.rank)
        a = np.asarray(node.a)  # PEFT's lora_A.weight is (r, in): jlora's A transposed
        sign = np.sign((a.T * comps.numpy()).sum(1, keepdims=True))
        np.testing.assert_allclose(a.T * sign, comps.numpy(), rtol=1e-3, atol=1e-3)
