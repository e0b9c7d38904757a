"""Factored apply equals the materialized W0 + s*A@B, outputs and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from conftest import BF16, F32, check_against_materialized, randomize

X = jax.random.normal(jax.random.key(42), (2, 5, 16))


class Mlp(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.dtype)
        h = jax.nn.gelu(nn.Dense(32, name="up_proj", **kw)(x))
        return nn.Dense(16, name="down_proj", **kw)(h)


class Attn(nn.Module):
    """DenseGeneral kernels (in, heads, head_dim) and (heads, head_dim, out)."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((4, 8), name="q_proj")(x)
        k = nn.DenseGeneral((4, 8), name="k_proj")(x)
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 8.0**0.5)
        o = jnp.einsum("bhqk,bkhd->bqhd", w, q)
        return nn.DenseGeneral(16, axis=(-2, -1), name="o_proj")(o)


class EinsumModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((16, 3, 8), "bti,ihd->bthd", use_bias=False, name="q_proj")(x)
        return nn.Einsum((3, 8, 16), "bthd,hdo->bto", use_bias=False, name="o_proj")(h)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(16, name="q_proj")(x)
        return x + jnp.tanh(nn.Dense(16, name="v_proj")(h)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(
            nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return layers(name="layers")(x, None)[0]


def _setup(model, targets, key, with_fn=True, dtype=None):
    params = model.init(key, X)
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=targets, dtype=dtype)
    extra = (model.apply, X) if with_fn else ()
    adapter = randomize(jlora.init(jax.random.fold_in(key, 1), params, cfg, *extra), key)
    return params, adapter


@pytest.mark.parametrize("jit", [True, False])
def test_linen_dense(key, jit):
    params, adapter = _setup(Mlp(), ("up_proj", "down_proj"), key, with_fn=False)
    check_against_materialized(Mlp().apply, params, adapter, X, jit=jit)


@pytest.mark.parametrize("dtype, factors", [(None, jnp.float32), ("base", jnp.bfloat16)])
def test_linen_dense_bf16(key, dtype, factors):
    """A bf16 base: float32 factors by default (PEFT's autocast_adapter_dtype), its own
    dtype with dtype="base"; either way the merged weight's numbers."""
    model = Mlp(dtype=jnp.bfloat16)
    params, adapter = _setup(model, ("up_proj", "down_proj"), key, with_fn=False, dtype=dtype)
    assert {leaf.dtype for leaf in jax.tree.leaves(adapter)} == {jnp.dtype(factors)}
    check_against_materialized(model.apply, params, adapter, X.astype(jnp.bfloat16), tol=BF16)


@pytest.mark.parametrize("jit", [True, False])
def test_dense_general_axes_learned_by_tracing(key, jit):
    params, adapter = _setup(Attn(), ("q_proj", "k_proj", "o_proj"), key)
    node = adapter["params"]["q_proj"]["kernel"]
    assert (node.in_axes, node.out_axes, node.a.shape, node.b.shape) == (
        (0,),
        (1, 2),
        (16, 4),
        (4, 32),
    )
    node = adapter["params"]["o_proj"]["kernel"]
    assert (node.in_axes, node.out_axes, node.a.shape) == ((0, 1), (2,), (32, 4))
    check_against_materialized(Attn().apply, params, adapter, X, jit=jit)


def test_dense_general_without_fn_is_refused_at_init(key):
    """A head-split kernel's layout is ambiguous without fn: init says to pass it."""
    with pytest.raises(
        jlora.LoraError,
        match=r"o_proj.*\(4, 8, 16\).*jlora.init\(key, "
        r"params, cfg, fn",
    ):
        _setup(Attn(), ("o_proj",), key, with_fn=False)
    params, adapter = _setup(Attn(), ("o_proj",), key)  # learned by tracing: fine
    check_against_materialized(Attn().apply, params, adapter, X)


def test_linen_einsum(key):
    params, adapter = _setup(EinsumModel(), ("q_proj", "o_proj"), key)
    check_against_materialized(EinsumModel().apply, params, adapter, X)


@pytest.mark.parametrize("jit", [True, False])
def test_linen_scan_and_remat(key, jit):
    params, adapter = _setup(Scanned(), ("q_proj", "v_proj"), key, with_fn=False)
    node = adapter["params"]["layers"]["q_proj"]["kernel"]
    assert node.a.shape == (3, 16, 4) and node.stack_axes == (0,)
    assert jlora.explain(Scanned().apply, params, adapter, X) == {
        "params/layers/q_proj/kernel": ["factored"],
        "params/layers/v_proj/kernel": ["factored"],
    }
    check_against_materialized(Scanned().apply, params, adapter, X, jit=jit)


class NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(16, 24, rngs=rngs)
        self.v_proj = nnx.Linear(24, 16, rngs=rngs)

    def __call__(self, x):
        return self.v_proj(jax.nn.relu(self.q_proj(x)))


def test_nnx_split_merge(key):
    graphdef, state = nnx.split(NnxMlp(nnx.Rngs(0)))
    fn = lambda st, x: nnx.merge(graphdef, st)(x)
    cfg = jlora.LoraConfig(rank=4, targets=("q_proj", "v_proj"))
    adapter = randomize(jlora.init(key, state, cfg, fn, X), key)
    assert jlora.explain(fn, state, adapter, X) == {
        "q_proj/kernel": ["factored"],
        "v_proj/kernel": ["factored"],
    }
    check_against_materialized(fn, state, adapter, X)


def _plain(p, x):
    """A torch-layout (out, in) weight used as x @ w.T, and an Equinox-style w @ x."""
    h = jnp.tanh(x @ p["q_proj"].T)
    return jax.vmap(jax.vmap(lambda v: p["o_proj"] @ v))(h)


def test_plain_function_out_in_weights(key):
    params = {
        "q_proj": jax.random.normal(key, (24, 16)) * 0.2,
        "o_proj": jax.random.normal(key, (16, 24)) * 0.2,
    }
    cfg = jlora.LoraConfig(rank=4, targets=("q_proj", "o_proj"))
    adapter = randomize(jlora.init(key, params, cfg, _plain, X), key)
    assert adapter["q_proj"].in_axes == (1,) and adapter["q_proj"].a.shape == (16, 4)
    assert adapter["o_proj"].in_axes == (1,) and adapter["o_proj"].b.shape == (4, 16)
    check_against_materialized(_plain, params, adapter, X)


def test_weight_used_in_two_layouts_is_still_factored(key):
    """A tied embedding: looked up and used as logits x @ E.T, both factored."""
    emb = jax.random.normal(key, (50, 16))
    fn = lambda p, ids: jnp.take(p["embed"], ids, axis=0) @ p["embed"].T
    ids = jnp.arange(6).reshape(2, 3)
    adapter = randomize(
        jlora.init(key, {"embed": emb}, jlora.LoraConfig(rank=2, targets=("embed",))), key
    )
    uses = jlora.explain(fn, {"embed": emb}, adapter, ids)["embed"]
    # init took (vocab, hidden) as (in, out); x @ E.T contracts hidden: transposed
    assert uses == ["factored", jlora._src.interpret.uses.TRANSPOSED]
    check_against_materialized(fn, {"embed": emb}, adapter, ids)


def test_explain_says_when_a_use_is_transposed_against_init(key):
    """An Equinox-style (out, in) weight: without fn init takes axis 0 as in; x @ W.T then
    contracts the adapter's out axis, and explain says so. With fn init learns the axes."""
    params = {"linear": {"weight": jax.random.normal(key, (24, 16))}}  # (out, in)
    fn = lambda p, x: x @ p["linear"]["weight"].T
    x = jax.random.normal(key, (3, 16))
    cfg = jlora.LoraConfig(rank=4, targets=("linear",))
    blind = randomize(jlora.init(key, params, cfg), key)
    (use,) = jlora.explain(fn, params, blind, x)["linear/weight"]
    assert use.startswith("factored (transposed") and "jlora.init(key, params, cfg, fn" in use
    check_against_materialized(fn, params, blind, x)  # still the right numbers
    traced = randomize(jlora.init(key, params, cfg, fn, x), key)
    node = traced["linear"]["weight"]
    assert (node.in_axes, node.out_axes, node.a.shape) == ((1,), (0,), (16, 4))
    assert jlora.explain(fn, params, traced, x) == {"linear/weight": ["factored"]}
    check_against_materialized(fn, params, traced, x)


def _control_flow(p, x):
    w = p["w"]

    @jax.custom_vjp
    def mm(x, w):
        return x @ w

    mm.defvjp(
        lambda x, w: (x @ w, (x, w)),  # not the primal's derivative: the user's rule
        lambda r, g: (g @ r[1].T, 0.5 * jnp.einsum("...i,...o->io", r[0], g)),
    )
    y = jax.jit(lambda x, w: jax.nn.relu(x @ w))(x, w)
    y = jax.lax.cond(jnp.sum(x) > -1e9, lambda y: y @ w.T, lambda y: -(y @ w.T), y)
    return mm(y, w) + jax.nn.softplus(y[..., :1] * 0 + 1)


def _while(p, x):
    step = lambda c: (jnp.tanh(c[0] @ p["w"]) @ p["w"].T, c[1] + 1)
    return jax.lax.while_loop(lambda c: c[1] < 2, step, (x, 0))[0]


@pytest.mark.parametrize("fn, grad", [(_control_flow, True), (_while, False)])
def test_control_flow_primitives(key, fn, grad):
    """jit, cond, custom_vjp with its own backward (gradients too) and while (forward: no
    reverse mode in JAX)."""
    params = {"w": jax.random.normal(key, (16, 16)) * 0.3}
    adapter = randomize(jlora.init(key, params, jlora.LoraConfig(rank=3, targets=("w",))), key)
    uses = set(jlora.explain(fn, params, adapter, X)["w"])
    want = {"factored", jlora._src.interpret.uses.TRANSPOSED}  # w and w.T both used
    if fn is _control_flow:  # the custom_vjp gets w materialized, so its backward runs
        want.add(f"materialized ({jlora._src.interpret.control.KEEPS_VJP})")
    assert uses == want
    check_against_materialized(fn, params, adapter, X, grad=grad)


def test_init_leaves_outputs_unchanged(key):
    params = Scanned().init(key, X)
    for init in ("kaiming", "gaussian"):
        adapter = jlora.init(key, params, jlora.LoraConfig(targets=("q_proj",), init=init))
        np.testing.assert_array_equal(
            jax.jit(jlora.apply(Scanned().apply))(params, adapter, X),
            jax.jit(Scanned().apply)(params, X),
        )


def test_no_retrace_on_second_call_or_new_adapter(key):
    params, adapter = _setup(Scanned(), ("q_proj",), key, with_fn=False)
    traces = []

    def fn(p, x):
        traces.append(1)
        return Scanned().apply(p, x)

    f = jax.jit(jlora.apply(fn))
    f(params, adapter, X)
    f(params, adapter, X)
    f(params, randomize(adapter, jax.random.key(9)), X)
    assert len(traces) == 1 and f._cache_size() == 1


def test_an_eager_call_does_not_trace_fn_again(key):
    """Un-jitted: the traced jaxpr is kept per fn and argument shapes, so a second call
    (or another adapter) on the same shapes does not trace fn; new shapes, a new static
    argument or a closure over a tracer trace again. Outputs stay right."""
    params, adapter = _setup(Scanned(), ("q_proj",), key, with_fn=False)
    traces = []

    def fn(p, x, scale=1.0):
        traces.append(1)
        return Scanned().apply(p, x) * scale

    f = jlora.apply(fn)
    first = f(params, adapter, X)
    other = randomize(adapter, jax.random.key(9))
    np.testing.assert_allclose(f(params, other, X), jax.jit(f)(params, other, X), **F32)
    assert len(traces) == 1
    np.testing.assert_array_equal(f(params, adapter, X), first)
    f(params, adapter, X[:1])
    f(params, adapter, X, scale=2.0)
    assert len(traces) == 3

    @jax.jit
    def outer(c):  # fn closes over a tracer of the enclosing jit
        g = jlora.apply(lambda p, x: Scanned().apply(p, x) * c)
        return g(params, adapter, X)

    np.testing.assert_allclose(outer(2.0), 2 * first, **F32)
    np.testing.assert_allclose(outer(3.0), 3 * first, **F32)
    kept = jlora._src.interpret.trace._CACHE.values()
    assert not any(isinstance(c, jax.core.Tracer) for closed, _ in kept for c in closed.consts)


def test_static_python_arguments_stay_static(key):
    """Non-array arguments (flags, strings) are closed over, not traced."""
    params = {"w": jnp.ones((16, 16))}
    ad = jlora.init(key, params, jlora.LoraConfig(rank=2, targets=("w",)))

    def fn(p, x, mode, scale=1.0):
        return (x @ p["w"]) * scale if mode == "mul" else x

    assert jlora.explain(fn, params, ad, X, "mul", scale=2.0) == {"w": ["factored"]}
    np.testing.assert_array_equal(
        jlora.apply(fn)(params, ad, X, "mul", scale=2.0), fn(params, X, "mul", scale=2.0)
    )


def test_inputs_are_not_modified(key):
    params, adapter = _setup(Mlp(), ("up_proj",), key, with_fn=False)
    before = jax.tree.map(np.array, (params, adapter))
    jlora.apply(Mlp().apply)(params, adapter, X, lora_rng=key)
    jlora.merge(params, adapter)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((params, adapter))):
        np.testing.assert_array_equal(a, b)
