"""Convolutions of an adapted kernel, factored: ``conv(x, W0) + s * conv(x, A) @ B`` (PEFT's
conv LoRA). Reference: the merged kernel (outputs and gradients, fp32 1e-5)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from conftest import check_against_materialized, randomize


class Net(nn.Module):
    """Strided, dilated and 1-D convolutions (Flax: HWIO kernels, NHWC inputs)."""

    groups: int = 1

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding="SAME", name="c1")(x))
        x = nn.Conv(
            6,
            (3, 3),
            kernel_dilation=2,
            padding="VALID",
            name="c2",
            feature_group_count=self.groups,
        )(x)
        return nn.Conv(5, (3,), name="c3")(x.reshape(x.shape[0], -1, x.shape[-1]))


X = jax.random.normal(jax.random.key(3), (2, 16, 16, 4))


def test_flax_convolutions_are_factored(key):
    params = Net().init(key, X)
    cfg = jlora.LoraConfig(rank=3, targets=("c1", "c2", "c3"))
    adapter = randomize(jlora.init(key, params, cfg, Net().apply, X), key)
    c1 = adapter["params"]["c1"]["kernel"]
    assert (c1.in_axes, c1.out_axes, c1.a.shape, c1.b.shape) == ((0, 1, 2), (3,), (36, 3), (3, 8))
    assert set(sum(jlora.explain(Net().apply, params, adapter, X).values(), [])) == {"factored"}
    check_against_materialized(Net().apply, params, adapter, X)


def test_oihw_kernels_on_nchw_inputs(key):
    """Equinox/torch layout: (out, in, kh, kw); in = (in, kh, kw) as PEFT's lora_A."""
    params = {"conv": jax.random.normal(key, (6, 4, 3, 3))}
    fn = lambda p, x: jax.lax.conv_general_dilated(
        x,
        p["conv"],
        (2, 1),
        ((1, 2), (0, 1)),
        rhs_dilation=(1, 2),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    x = jax.random.normal(key, (2, 4, 9, 9))
    adapter = randomize(
        jlora.init(key, params, jlora.LoraConfig(rank=2, targets=("conv",)), fn, x), key
    )
    node = adapter["conv"]
    assert (node.in_axes, node.out_axes) == ((1, 2, 3), (0,))
    assert jlora.explain(fn, params, adapter, x) == {"conv": ["factored"]}
    check_against_materialized(fn, params, adapter, x)


def test_without_fn_a_conv_kernel_is_refused(key):
    params = Net().init(key, X)
    with pytest.raises(jlora.LoraError, match=r"params/c1/kernel.*\(3, 3, 4, 8\).*fn"):
        jlora.init(key, params, jlora.LoraConfig(rank=3, targets=("c1",)))


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_convs_are_factored(key, groups, dora):
    """Grouped (2) and depthwise (4 groups of 4 channels) convolutions: A runs once per
    group, each output feature takes B on its own group's rank-r block."""
    net = Net(groups=groups) if groups == 2 else None
    params = net.init(key, X) if net else {"w": jax.random.normal(key, (3, 3, 1, 8))}
    fn = (
        net.apply
        if net
        else lambda p, x: jax.lax.conv_general_dilated(
            x,
            p["w"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=4,
        )
    )
    cfg = jlora.LoraConfig(rank=2, targets=("c2",) if net else ("w",), dora=dora)
    adapter = randomize(jlora.init(key, params, cfg, fn, X), key)
    assert set(sum(jlora.explain(fn, params, adapter, X).values(), [])) == {"factored"}
    check_against_materialized(fn, params, adapter, X)


def test_batch_grouped_convs_materialize_and_say_why(key):
    params = {"w": jax.random.normal(key, (3, 3, 4, 6))}
    fn = lambda p, x: jax.lax.conv_general_dilated(
        x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), batch_group_count=2
    )
    cfg = jlora.LoraConfig(rank=2, targets=("w",))
    adapter = randomize(jlora.init(key, params, cfg, fn, X), key)
    assert jlora.explain(fn, params, adapter, X) == {
        "w": ["materialized (convolution with batch_group_count)"]
    }
    check_against_materialized(fn, params, adapter, X)


def test_dora_convs_are_factored(key):
    """PEFT's DoRA on a conv: the norm of W0 + s A B over (spatial, in) per out feature."""
    params = Net().init(key, X)
    cfg = jlora.LoraConfig(rank=3, targets=("c1", "c2", "c3"), dora=True)
    adapter = randomize(jlora.init(key, params, cfg, Net().apply, X), key)
    assert adapter["params"]["c1"]["kernel"].magnitude.shape == (8,)
    assert set(sum(jlora.explain(Net().apply, params, adapter, X).values(), [])) == {"factored"}
    check_against_materialized(Net().apply, params, adapter, X)


class ConvNet(nn.Module):
    """A small ResNet-style CNN on 32x32 inputs (3x3 convs, 128-256 channels, a residual)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(128, (3, 3), name="stem")(x))
        x = x + nn.Conv(128, (3, 3), name="res")(nn.relu(nn.Conv(128, (3, 3), name="mid")(x)))
        x = nn.relu(nn.Conv(256, (3, 3), strides=2, name="down")(x))
        return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


def test_conv_net_lora_step_flops_below_full_fine_tuning(key):
    """XLA FLOPs (deterministic) of the gradient step, rank-4 LoRA on every conv: at most
    0.75x full fine-tuning (measured 0.70x; rank r over c output channels costs about
    r/c of each conv, so narrow convs gain less)."""
    x = jax.random.normal(key, (8, 32, 32, 3))
    net = ConvNet()
    params = net.init(key, x)
    cfg = jlora.LoraConfig(rank=4, targets=("stem", "mid", "res", "down"))
    adapter = jlora.init(key, params, cfg, net.apply, x)
    assert set(sum(jlora.explain(net.apply, params, adapter, x).values(), [])) == {"factored"}
    lora = lambda ad: jnp.sum(jnp.square(jlora.apply(net.apply)(params, ad, x)))
    full = lambda p: jnp.sum(jnp.square(net.apply(p, x)))
    flops = lambda f, a: jax.jit(jax.grad(f)).lower(a).compile().cost_analysis()["flops"]
    ratio = flops(lora, adapter) / flops(full, params)
    assert ratio <= 0.75, ratio


def test_dora_conv_dropout_branch(key):
    """With dropout that never drops (rate 1e-7), the dropout formula
    ``base + (g - 1) conv(drop(x), W0) + g y`` must equal ``g (base + y)``."""
    params = Net().init(key, X)
    cfg = jlora.LoraConfig(rank=3, targets=("c1",), dora=True, dropout=1e-7)
    adapter = randomize(jlora.init(key, params, cfg, Net().apply, X), key)
    f = jlora.apply(Net().apply)
    np.testing.assert_allclose(
        f(params, adapter, X, lora_rng=jax.random.key(1)),
        f(params, adapter, X, deterministic=True),
        rtol=1e-5,
        atol=1e-5,
    )


# The convolutions Keras 3 writes, in lax (no keras dependency): HWIO kernels, NHWC inputs.
_DN = ("NHWC", "HWIO", "NHWC")


def _depthwise(p, x):
    """``DepthwiseConv2D``: kernel ``(kh, kw, in, mult)`` reshaped to ``(kh, kw, 1, in*mult)``,
    one group per input channel."""
    kh, kw, cin, mult = p["dw"].shape
    return jax.lax.conv_general_dilated(
        x,
        p["dw"].reshape(kh, kw, 1, cin * mult),
        (1, 1),
        "SAME",
        dimension_numbers=_DN,
        feature_group_count=cin,
    )


def _separable(p, x):
    """``SeparableConv2D``: the depthwise step, then a 1x1 pointwise convolution."""
    return jax.lax.conv_general_dilated(
        _depthwise(p, x), p["pw"], (1, 1), "VALID", dimension_numbers=_DN
    )


def _transposed(p, x):
    """``Conv2DTranspose``: kernel ``(kh, kw, filters, in)``; ``transpose_kernel`` flips it
    (``rev``) and swaps its feature axes."""
    return jax.lax.conv_transpose(
        x, p["tc"], (2, 2), "SAME", dimension_numbers=_DN, transpose_kernel=True
    )


@pytest.mark.parametrize(
    "fn, shapes, axes",
    [
        (_depthwise, {"dw": (3, 3, 4, 2)}, {"dw": ((0, 1), (2, 3))}),
        (
            _separable,
            {"dw": (3, 3, 4, 2), "pw": (1, 1, 8, 5)},
            {"dw": ((0, 1), (2, 3)), "pw": ((0, 1, 2), (3,))},
        ),
        (_transposed, {"tc": (3, 3, 5, 4)}, {"tc": ((0, 1, 3), (2,))}),
    ],
)
def test_keras_convolutions_learn_their_axes_and_stay_factored(key, fn, shapes, axes):
    """``init(fn)`` follows the reshape into a grouped convolution and ``rev``; each use is
    factored, outputs and gradients equal to the merged kernel's (jitted)."""
    params = {
        k: jax.random.normal(jax.random.fold_in(key, i), s) * 0.3
        for i, (k, s) in enumerate(shapes.items())
    }
    cfg = jlora.LoraConfig(rank=2, targets=tuple(shapes))
    adapter = randomize(jlora.init(key, params, cfg, fn, X), key)
    assert {k: (n.in_axes, n.out_axes) for k, n in adapter.items()} == axes
    assert all(u == ["factored"] for u in jlora.explain(fn, params, adapter, X).values())
    check_against_materialized(fn, params, adapter, X)
