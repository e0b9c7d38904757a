"""Convolution adapters against the real PEFT (``nn.Conv2d``/``nn.Conv1d``), both directions.

PEFT's conv LoRA is ``lora_A.weight (r, in, kh, kw)`` (a conv with the layer's kernel) and
``lora_B.weight (out, r, 1, 1)``; jlora's conv node has the spatial and input-feature axes
"in". The same torch net runs in JAX with its kernels in torch's OIHW layout and in
Flax's HWIO layout; outputs must equal PEFT's (fp32, 1e-4), the merged kernels PEFT's
``merge_and_unload`` (1e-5).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jlora  # noqa: E402
from conftest import randomize  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)
CONVS = ("conv1", "conv2", "conv3")
#: (torch kernel) -> kernel in the jlora layout, and the lax dimension numbers of that layout
LAYOUTS = {
    "oihw": (lambda w: w, ("NCHW", "OIHW", "NCHW"), ("NCH", "OIH", "NCH")),
    "hwio": (
        lambda w: np.moveaxis(w, (0, 1), (-1, -2)),
        ("NCHW", "HWIO", "NCHW"),
        ("NCH", "HIO", "NCH"),
    ),
}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 6, (3, 2), stride=2, padding=1)  # PEFT: no dilation
        self.conv3 = torch.nn.Conv1d(6, 5, 3, padding=1)

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x)))
        return self.conv3(h.flatten(2))


def _jax_net(layout):
    to_jlora, dn2, dn1 = LAYOUTS[layout]
    net = Net()
    params = {
        n: {
            "kernel": jnp.asarray(to_jlora(getattr(net, n).weight.detach().numpy())),
            "bias": jnp.asarray(getattr(net, n).bias.detach().numpy()),
        }
        for n in CONVS
    }

    def fn(p, x):
        def conv(x, n, dn, **kw):
            y = jax.lax.conv_general_dilated(x, p[n]["kernel"], dimension_numbers=dn, **kw)
            return y + p[n]["bias"].reshape(1, -1, *(1,) * (y.ndim - 2))

        h = conv(
            jax.nn.relu(conv(x, "conv1", dn2, window_strides=(1, 1), padding=((1, 1), (1, 1)))),
            "conv2",
            dn2,
            window_strides=(2, 2),
            padding=((1, 1), (1, 1)),
        )
        return conv(
            h.reshape(*h.shape[:2], -1), "conv3", dn1, window_strides=(1,), padding=((1, 1),)
        )

    return params, fn


def _x():
    return np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)


def _torch_out(model, x):
    with torch.no_grad():
        return model(torch.tensor(x)).numpy()


def _module(path, index=()):
    return path.split("/")[0]


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_peft_conv_adapter_loads_into_jlora(tmp_path, layout, dora):
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(CONVS), use_dora=dora, init_lora_weights=False
    )
    pm = peft.get_peft_model(Net(), cfg).eval()
    pm.save_pretrained(tmp_path)
    params, fn = _jax_net(layout)
    x = _x()
    assert np.allclose(fn(params, x), _torch_out(Net(), x), **TOL)  # the nets agree
    ad = jlora.peft.load(str(tmp_path), params, module_fn=_module)
    node = jlora._src.adapter.adapter_nodes(ad)["conv1/kernel"]
    assert node.a.shape == (3 * 3 * 3, 4) and len(node.in_axes) == 3
    assert set(sum(jlora.explain(fn, params, ad, x).values(), [])) == {"factored"}
    np.testing.assert_allclose(jax.jit(jlora.apply(fn))(params, ad, x), _torch_out(pm, x), **TOL)
    merged = jlora.merge(params, ad)
    peft_merged = pm.merge_and_unload()
    for n in CONVS:
        want = LAYOUTS[layout][0](getattr(peft_merged, n).weight.detach().numpy())
        np.testing.assert_allclose(merged[n]["kernel"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_jlora_conv_adapter_loads_into_peft(tmp_path, key, layout, dora):
    params, fn = _jax_net(layout)
    x = _x()
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=CONVS, dora=dora)
    ad = randomize(jlora.init(key, params, cfg, fn, x), key)
    jlora.peft.save(str(tmp_path), ad, module_fn=_module)
    pm = peft.PeftModel.from_pretrained(Net(), str(tmp_path)).eval()
    np.testing.assert_allclose(_torch_out(pm, x), jlora.apply(fn)(params, ad, x), **TOL)
    back = jlora.peft.load(str(tmp_path), params, module_fn=_module)  # and round trip
    for mine, got in zip(jax.tree.leaves(ad), jax.tree.leaves(back)):
        np.testing.assert_array_equal(mine, got)


def test_an_ambiguous_conv_kernel_asks_for_axes(tmp_path):
    """A square (4, 4, 4, 4) kernel fits both (*k, in, out) and (out, in, *k)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 4))
    pm = peft.get_peft_model(
        net, peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path)
    params = {"0": {"kernel": jnp.zeros((4, 4, 4, 4))}}
    with pytest.raises(jlora.LoraError, match="fits both.*pass axes="):
        jlora.peft.load(str(tmp_path), params, module_fn=_module)
    ad = jlora.peft.load(
        str(tmp_path), params, module_fn=_module, axes={"0/kernel": ((), (1, 2, 3), (0,))}
    )
    la = pm.base_model.model[0].lora_A["default"].weight.detach().numpy()
    np.testing.assert_array_equal(ad["0"]["kernel"].a, la.reshape(2, -1).T)


def test_a_conv_trained_in_full_both_directions(tmp_path, key):
    """PEFT's modules_to_save on a conv: torch's (out, in, kh, kw) weight is a Flax
    (kh, kw, in, out) kernel; LoRA on the other convs beside it."""
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["conv1", "conv3"],
        modules_to_save=["conv2"],
        init_lora_weights=False,
    )
    pm = peft.get_peft_model(Net(), cfg).eval()
    saved = pm.base_model.model.conv2.modules_to_save["default"]
    with torch.no_grad():
        saved.weight.add_(0.1 * torch.randn_like(saved.weight))
        saved.bias.add_(0.1)
    pm.save_pretrained(tmp_path / "peft")
    params, fn = _jax_net("hwio")
    x = _x()
    ad = jlora.peft.load(str(tmp_path / "peft"), params, module_fn=_module)
    assert isinstance(ad["conv2"]["kernel"], jlora._src.adapter.FullNode)
    np.testing.assert_allclose(jlora.apply(fn)(params, ad, x), _torch_out(pm, x), **TOL)
    ad = jlora.init(
        key,
        params,
        jlora.LoraConfig(rank=4, targets=("conv1", "conv3"), modules_to_save=("conv2",)),
        fn,
        x,
    )
    ad = randomize(ad, key)
    jlora.peft.save(str(tmp_path / "jlora"), ad, module_fn=_module)
    back = peft.PeftModel.from_pretrained(Net(), str(tmp_path / "jlora")).eval()
    np.testing.assert_allclose(_torch_out(back, x), jlora.apply(fn)(params, ad, x), **TOL)
