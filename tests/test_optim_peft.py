"""``jlora.lorafa`` and ``jlora.riemannian`` against PEFT's optimizers: one step on the
same factors and gradients (the ``interop`` extra)."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from peft.optimizers import create_lorafa_optimizer, create_riemannian_optimizer  # noqa: E402

import jlora  # noqa: E402

IN, OUT, R = 7, 5, 4


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(IN, OUT, bias=False)

    def forward(self, x):
        return self.lin(x)


def _pair(rslora: bool, seed: int = 0):
    """A PEFT model with random factors and gradients, and the same as a jlora node."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=R, lora_alpha=8, target_modules=["lin"], use_rslora=rslora)
    model = peft.get_peft_model(Net(), cfg)
    lin = model.base_model.model.lin
    a_t, b_t = lin.lora_A["default"].weight, lin.lora_B["default"].weight
    with torch.no_grad():
        a_t.copy_(torch.randn(R, IN))
        b_t.copy_(torch.randn(OUT, R))
    grads = torch.randn(R, IN), torch.randn(OUT, R)
    params = {"lin": jnp.zeros((IN, OUT))}
    node = jlora.init(
        jax.random.key(0), params, jlora.LoraConfig(rank=R, alpha=8.0, rslora=rslora, targets="lin")
    )["lin"]
    as_j = lambda t: jnp.asarray(t.detach().numpy().T)
    node = dataclasses.replace(node, a=as_j(a_t), b=as_j(b_t))
    gnode = dataclasses.replace(node, a=as_j(grads[0]), b=as_j(grads[1]))
    return model, (a_t, b_t), grads, {"lin": node}, {"lin": gnode}


def _step_jlora(tx, ad, grads):
    upd, _ = tx.update(grads, tx.init(ad), ad)
    (node,) = optax.apply_updates(ad, upd).values()
    return node


@pytest.mark.parametrize("rslora", [False, True])
def test_lorafa_steps_equal_peft(rslora, monkeypatch):
    """Three AdamW steps on the same gradients. PEFT adds eps before Adam's bias
    correction and optax after, so both run with eps 1e-12 here; and PEFT computes the
    projection under bf16 autocast where bf16 is available (3.5e-5 apart after three
    steps), so it runs in float32 here, as jlora's does."""
    monkeypatch.setattr(peft.optimizers.lorafa, "is_bf16_available", lambda: False)
    model, (a_t, b_t), _, ad, grads = _pair(rslora)
    # PEFT 0.22 reads r, lora_alpha and use_rslora from the model's LoraConfig and deprecates
    # passing them (an error from PEFT 1.2); earlier versions need r and lora_alpha
    if "r" in inspect.signature(create_lorafa_optimizer).parameters:
        opt = create_lorafa_optimizer(model, r=R, lora_alpha=8, lr=1e-2)
    else:
        opt = create_lorafa_optimizer(model, lr=1e-2)
    opt.param_groups[0]["eps"] = 1e-12
    tx = jlora.lorafa(optax.adamw, 1e-2, eps=1e-12, weight_decay=0.0)
    state, node = tx.init(ad), ad
    for step in range(3):
        g = torch.randn(OUT, R, generator=torch.Generator().manual_seed(step)) * (step + 1)
        b_t.grad = g.clone()
        opt.step()
        gnode = dataclasses.replace(grads["lin"], b=jnp.asarray(g.numpy().T))
        upd, state = tx.update({"lin": gnode}, state, node)
        node = optax.apply_updates(node, upd)
        np.testing.assert_array_equal(node["lin"].a, ad["lin"].a)  # A stays at its init
        np.testing.assert_allclose(
            node["lin"].b, b_t.detach().numpy().T, rtol=1e-5, atol=1e-5, err_msg=f"step {step}"
        )
    sizes = [x.size for x in jax.tree.leaves(state)]  # B's two moments and step counts
    assert sum(sizes) <= 2 * ad["lin"].b.size + 4, sizes


def test_lorafa_projects_b_as_the_closed_form():
    """One SGD step: ``b - lr (a^T a + delta I)^-1 g_b / s^2`` in float64."""
    _, _, _, ad, grads = _pair(True)
    got = _step_jlora(jlora.lorafa(optax.sgd, 0.1), ad, grads)
    a, b, g = (np.asarray(x, np.float64) for x in (ad["lin"].a, ad["lin"].b, grads["lin"].b))
    s = ad["lin"].scale
    want = b - 0.1 * np.linalg.solve(a.T @ a + 1e-8 * np.eye(R), g) / s**2
    np.testing.assert_allclose(got.b, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.a, ad["lin"].a)


@pytest.mark.parametrize(
    "make, torch_opt, kw",
    [
        (optax.sgd, torch.optim.SGD, {}),
        (optax.adam, torch.optim.Adam, {"eps": 1e-8}),
    ],
)
def test_riemannian_step_equals_peft(make, torch_opt, kw):
    model, (a_t, b_t), (ga, gb), ad, grads = _pair(False, seed=1)
    opt = create_riemannian_optimizer(model, torch_opt, lr=1e-2, reg=0.05)
    a_t.grad, b_t.grad = ga.clone(), gb.clone()
    opt.step()
    got = _step_jlora(jlora.riemannian(make, 1e-2, delta=0.05, **kw), ad, grads)
    np.testing.assert_allclose(got.a, a_t.detach().numpy().T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.b, b_t.detach().numpy().T, rtol=1e-5, atol=1e-5)


def test_stacked_nodes_are_preconditioned_per_matrix(key):
    """A scanned stack of 3 layers: each layer's step equals that layer's node alone."""
    params = {"w": jnp.zeros((3, IN, OUT))}
    cfg = jlora.LoraConfig(rank=R, targets="w")
    ad = jax.tree.map(
        lambda x: jax.random.normal(key, x.shape),
        jlora.init(key, params, cfg, lambda p, x: x @ p["w"][0], jnp.ones(IN)),
    )
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(key, 1), x.shape), ad)
    for tx in (jlora.riemannian(optax.sgd, 0.1), jlora.lorafa(optax.sgd, 0.1)):
        whole = _step_jlora(tx, ad, grads)
        for layer in range(3):
            one = lambda t: {
                "lin": dataclasses.replace(
                    t["w"],
                    a=t["w"].a[layer],
                    b=t["w"].b[layer],
                    shape=(IN, OUT),
                    stack_axes=(),
                    in_axes=(0,),
                    out_axes=(1,),
                )
            }
            alone = _step_jlora(tx, one(ad), one(grads))
            np.testing.assert_allclose(whole.a[layer], alone.a, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(whole.b[layer], alone.b, rtol=1e-5, atol=1e-6)


def test_update_without_params_is_refused(key):
    ad = jlora.init(key, {"w": jnp.ones((4, 3))}, jlora.LoraConfig(rank=2, targets="w"))
    tx = jlora.riemannian(optax.sgd, 0.1)
    with pytest.raises(ValueError, match="tx.update\\(grads, state, params\\)"):
        tx.update(ad, tx.init(ad))
