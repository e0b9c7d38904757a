"""Forward-mode autodiff through ``jlora.apply``: jvp, jacfwd, hessian, forward-over-reverse.

Every derivative is compared against the same derivative of the model on the
merged weight built with plain jnp (``ref_merge_jnp``: no jlora code), in
float32 at 1e-5 (tolerances relative to the largest reference value).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jlora
from conftest import F32, close, randomize, ref_merge_jnp

X = jax.random.normal(jax.random.key(3), (2, 3, 6))


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(8, name="up_proj")(x))
        return nn.Dense(5, name="down_proj")(h)


def _setup(dora=False):
    model = Mlp()
    params = model.init(jax.random.key(0), X)
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=("up_proj", "down_proj"), dora=dora)
    adapter = randomize(
        jlora.init(jax.random.key(1), params, cfg, model.apply, X), jax.random.key(2)
    )
    lora = lambda ad, x: jlora.apply(model.apply)(params, ad, x)
    ref = lambda ad, x: model.apply(ref_merge_jnp(params, ad), x)
    return lora, ref, adapter


@pytest.mark.parametrize("dora", [False, True])
def test_jvp_wrt_input_and_adapter(dora):
    lora, ref, ad = _setup(dora)
    dx = jax.random.normal(jax.random.key(4), X.shape)
    dad = randomize(ad, jax.random.key(5))
    for f, g in ((lora, ref), (jax.jit(lora), ref)):
        out, tan = jax.jvp(lambda x: f(ad, x), (X,), (dx,))
        want_out, want_tan = jax.jvp(lambda x: g(ad, x), (X,), (dx,))
        close(out, want_out, F32)
        close(tan, want_tan, F32)
        _, tan = jax.jvp(lambda a: f(a, X), (ad,), (dad,))
        close(tan, jax.jvp(lambda a: g(a, X), (ad,), (dad,))[1], F32)


def test_jacfwd_equals_jacrev_and_the_reference():
    lora, ref, ad = _setup()
    x = X[:1, :1]
    fwd = jax.jacfwd(lambda x: lora(ad, x))(x)
    close(fwd, jax.jacfwd(lambda x: ref(ad, x))(x), F32)
    close(fwd, jax.jacrev(lambda x: lora(ad, x))(x), F32)
    by_factor = jax.jacfwd(lambda a: lora(a, x))(ad)
    close(by_factor, jax.jacfwd(lambda a: ref(a, x))(ad), F32)


def test_hessian_wrt_input_and_adapter():
    lora, ref, ad = _setup()
    x = X[:1, :2]
    loss = lambda f: lambda ad, x: jnp.sum(f(ad, x) ** 2)
    close(jax.hessian(loss(lora), argnums=1)(ad, x), jax.hessian(loss(ref), argnums=1)(ad, x), F32)
    close(jax.jit(jax.hessian(loss(lora)))(ad, x), jax.hessian(loss(ref))(ad, x), F32)


def test_forward_over_reverse_hvp():
    lora, ref, ad = _setup()
    v = randomize(ad, jax.random.key(6))

    def hvp(f):
        grad = jax.grad(lambda a: jnp.sum(jnp.sin(f(a, X))))
        return jax.jvp(grad, (ad,), (v,))[1]

    close(jax.jit(lambda: hvp(lora))(), hvp(ref), F32)


def test_vmap_of_jvp_batches_the_low_rank_product():
    lora, ref, ad = _setup()
    xs = jax.random.normal(jax.random.key(8), (4,) + X.shape)
    tan = jax.vmap(lambda x: jax.jvp(lambda x: lora(ad, x), (x,), (x,))[1])(xs)
    close(tan, jax.vmap(lambda x: jax.jvp(lambda x: ref(ad, x), (x,), (x,))[1])(xs), F32)
