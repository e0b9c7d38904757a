"""Explicit-sharding cases (``jax.make_mesh``'s default axes, entered with ``jax.set_mesh``)
on small models whose code is itself sharding-aware; ``test_sharding.py`` runs this file on 8
virtual CPU devices. References: the same function on the merged weight (``jlora.merge``)
and the closed-form ``W0 + s * A @ B``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, reshard
from jax.sharding import PartitionSpec as P

import jlora
from conftest import randomize

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="run by test_sharding.py")
D, H, B = 16, 32, 8


@pytest.fixture
def mesh():
    m = jax.make_mesh((2, 4), ("data", "model"))  # AxisType.Explicit, JAX's default
    with jax.set_mesh(m):
        yield m


def setup(key, m, **lora):
    k1, k2, k3 = jax.random.split(key, 3)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(m, P(*spec)))
    params = {
        "up": {"kernel": put(jax.random.normal(k1, (D, H)) / 4, None, "model")},
        "down": {"kernel": put(jax.random.normal(k2, (H, D)) / 4, "model", None)},
    }
    adapter = jlora.init(key, params, jlora.LoraConfig(rank=4, targets=("up", "down"), **lora))
    adapter = jax.device_put(randomize(adapter, key), jlora.adapter_shardings(params, adapter))
    return params, adapter, put(jax.random.normal(k3, (B, D)), "data", None)


def megatron(p, x):
    """Column- then row-parallel, the row-parallel product's output sharding named."""
    h = jax.nn.gelu(jnp.einsum("bd,dh->bh", x, p["up"]["kernel"]))
    return jnp.einsum("bh,hd->bd", h, p["down"]["kernel"], out_sharding=P("data", None))


def constrained(p, x):
    h = jax.lax.with_sharding_constraint(x @ p["up"]["kernel"], P("data", "model"))
    h = reshard(jnp.tanh(h), P("data", None))  # gathers the activation: a plain matmul next
    return h @ p["down"]["kernel"]


def mapped(p, x):
    """The row-parallel half written per device with ``shard_map`` and a ``psum``."""
    h = jnp.tanh(x @ p["up"]["kernel"])
    local = lambda h, w: jax.lax.psum(h @ w, "model")
    return jax.shard_map(
        local, in_specs=(P("data", "model"), P("model", None)), out_specs=P("data", None)
    )(h, p["down"]["kernel"])


def loss(fn, params, adapter, x):
    return jnp.sum(jnp.square(jlora.apply(fn)(params, adapter, x)))


@pytest.mark.parametrize("fn", [megatron, constrained, mapped])
@pytest.mark.parametrize("dora", [False, True])
def test_sharding_aware_models_match_the_merged_weight(key, mesh, fn, dora):
    params, adapter, x = setup(key, mesh, dora=dora)
    out = jax.jit(jlora.apply(fn))(params, adapter, x)
    want = fn(jlora.merge(params, adapter), x)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert out.sharding.spec == want.sharding.spec
    grads = jax.jit(jax.grad(loss, argnums=2), static_argnums=0)(fn, params, adapter, x)
    ref = jax.grad(lambda ad: jnp.sum(jnp.square(fn(jlora.merge(params, ad), x))))(adapter)
    for g, r, a in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), jax.tree.leaves(adapter)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
        assert g.sharding.is_equivalent_to(a.sharding, g.ndim)  # the adapter's layout kept
    uses = jlora.explain(fn, params, adapter, x)
    assert uses == {"down/kernel": ["factored"], "up/kernel": ["factored"]}


def test_init_places_and_merge_keeps_the_layout(key, mesh):
    params, adapter, _ = setup(key, mesh)
    up, down = adapter["up"]["kernel"], adapter["down"]["kernel"]
    assert (up.a.sharding.spec, up.b.sharding.spec) == (P(None, None), P(None, "model"))
    assert (down.a.sharding.spec, down.b.sharding.spec) == (P("model", None), P(None, None))
    merged = jax.jit(jlora.merge)(params, adapter)
    for name, node in (("up", up), ("down", down)):
        w = params[name]["kernel"]
        want = np.asarray(w) + node.scale * np.asarray(node.a) @ np.asarray(node.b)
        np.testing.assert_allclose(merged[name]["kernel"], want, rtol=1e-5, atol=1e-6)
        assert merged[name]["kernel"].sharding.spec == w.sharding.spec


def test_dropout_under_an_explicit_mesh(key, mesh):
    """The same masks as on one device (JAX's random bits do not depend on the sharding)."""
    params, adapter, x = setup(key, mesh, dropout=0.5)
    f = jax.jit(lambda p, ad, x, k: jlora.apply(megatron)(p, ad, x, lora_rng=k))
    out = f(params, adapter, x, jax.random.key(1))
    assert out.sharding.spec == P("data", None)
    one = jax.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    with jax.set_mesh(one):
        local = lambda t: jax.device_put(np.asarray(t), NamedSharding(one, P()))
        want = f(*jax.tree.map(local, (params, adapter, x)), jax.random.key(1))
        no_dropout = jlora.apply(megatron)(
            *jax.tree.map(local, (params, adapter, x)), deterministic=True
        )
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(want) - np.asarray(no_dropout)).max() > 1e-2


def test_mixed_adapter_batch_under_an_explicit_mesh(key, mesh):
    params, ad0, x = setup(key, mesh)
    _, ad1, _ = setup(jax.random.fold_in(key, 1), mesh)
    stacked = jlora.stack([ad0, ad1])
    ids = jnp.array([0, 1, -1, 1, 0, 0, 1, -1])
    out = jax.jit(lambda p, ad, x, i: jlora.apply(megatron)(p, ad, x, adapter_ids=i))(
        params, stacked, x, ids
    )
    each = [np.asarray(megatron(jlora.merge(params, ad), x)) for ad in (ad0, ad1)]
    each.append(np.asarray(megatron(params, x)))  # id -1: the base alone
    ref = np.stack([each[i][n] for n, i in enumerate(np.asarray(ids))])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [megatron, constrained, mapped])
def test_init_learns_the_axes_by_tracing_under_an_explicit_mesh(key, mesh, fn):
    params, adapter, x = setup(key, mesh)
    traced = jlora.init(key, params, jlora.LoraConfig(rank=4, targets=("up", "down")), fn, x)
    for name in ("up", "down"):
        got, want = traced[name]["kernel"], adapter[name]["kernel"]
        assert (got.in_axes, got.out_axes) == (want.in_axes, want.out_axes) == ((0,), (1,))
        assert got.a.sharding.spec == want.a.sharding.spec
        assert got.b.sharding.spec == want.b.sharding.spec


E = 4  # experts, one per device along "model"


def einsum_experts(p, x):
    """Expert parallel as a dense model writes it: each expert's tokens on its devices."""
    xe = reshard(jnp.broadcast_to(x[None], (E, *x.shape)), P("model", None, None))
    h = jnp.tanh(jnp.einsum("ebd,edh->ebh", xe, p["w_in"]))
    return jnp.einsum("ebh,ehd->bd", h, p["w_out"], out_sharding=P())


def ragged_experts(p, x):
    """Tokens in runs per expert through ``ragged_dot``, which under an explicit mesh needs
    the output's sharding named (and has no rule for its gradients in JAX 0.10: the
    model's own ``jax.grad`` fails, so only its forward is checked)."""
    sizes = jnp.array([3, 1, 0, 4], jnp.int32)
    h = jax.lax.ragged_dot(x, p["w_in"], sizes, out_sharding=P())
    return jax.lax.ragged_dot(jnp.tanh(h), p["w_out"], sizes, out_sharding=P())


@pytest.mark.parametrize(
    "fn, form",
    [(einsum_experts, None), (ragged_experts, "masked"), (ragged_experts, "ragged")],
    indirect=["form"],
)
def test_experts_sharded_along_the_mesh_are_factored(key, mesh, fn, form):
    """A MoE whose DoRA expert stacks are split over ``model`` (one expert a device): the
    adapter's factors split the same way, outputs (and, through einsums, gradients) equal
    the merged experts', every use factored (``form``: grouped rows as this CPU runs them,
    and as ``ragged_dot``)."""
    k1, k2, k3 = jax.random.split(key, 3)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    params = {
        "w_in": put(jax.random.normal(k1, (E, D, H)) / 4, "model", None, None),
        "w_out": put(jax.random.normal(k2, (E, H, D)) / 4, "model", None, None),
    }
    x = put(jax.random.normal(k3, (B, D)), None, None)
    cfg = jlora.LoraConfig(rank=4, targets=("w_in", "w_out"), dora=True)
    adapter = jax.tree.map(lambda v: v * 1.3, jlora.init(key, params, cfg, fn, x))
    adapter = jax.device_put(randomize(adapter, key), jlora.adapter_shardings(params, adapter))
    assert adapter["w_in"].a.sharding.spec == P("model", None, None)
    out = jax.jit(jlora.apply(fn))(params, adapter, x)
    np.testing.assert_allclose(out, fn(jlora.merge(params, adapter), x), rtol=1e-5, atol=1e-5)
    assert jlora.explain(fn, params, adapter, x) == {"w_in": ["factored"], "w_out": ["factored"]}
    if fn is ragged_experts:
        return
    grads = jax.jit(jax.grad(loss, argnums=2), static_argnums=0)(fn, params, adapter, x)
    ref = jax.grad(lambda ad: jnp.sum(jnp.square(fn(jlora.merge(params, ad), x))))(adapter)
    for g, r, a in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), jax.tree.leaves(adapter)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
        assert g.sharding.is_equivalent_to(a.sharding, g.ndim)
