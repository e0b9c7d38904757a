"""Sharding cases; ``test_sharding.py`` runs this file on 8 virtual CPU devices.

Mesh ``data x model = 2 x 4``; Megatron-style layout: q/k/v/gate/up column-parallel
(out sharded on ``model``), o/down row-parallel (in sharded), lm_head column-parallel.
"""

import re

import jax
import jax.numpy as jnp
import llama
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from conftest import randomize

CFG = llama.LlamaConfig(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_heads=4, num_layers=2
)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="run by test_sharding.py")


def mesh(shape=(2, 4), kind="auto"):
    """Auto (GSPMD) axes: XLA propagates shardings through the emitted ops; explicit
    axes (``jax.make_mesh``'s default): every aval carries its sharding."""
    types = (AxisType.Auto if kind == "auto" else AxisType.Explicit,) * 2
    return jax.make_mesh(shape, ("data", "model"), axis_types=types)


@pytest.fixture(params=["auto", "explicit"])
def kind(request):
    """Each case on both kinds of mesh; an explicit one is entered as JAX recommends."""
    if request.param == "auto":
        yield "auto"
        return
    with jax.set_mesh(mesh(kind="explicit")):
        yield "explicit"


def shard(params, m):
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: jax.device_put(
            x, NamedSharding(m, llama.megatron_spec(jlora._src.targets.path_str(kp), x.ndim))
        ),
        params,
    )


def setup(key, m=None, **lora):
    params = llama.init_params(CFG, key)
    ids = jax.random.randint(key, (4, 9), 0, CFG.vocab_size)
    cfg = jlora.LoraConfig.preset("complex", rank=8, alpha=16.0, **lora)
    if m is None:
        return params, randomize(jlora.init(key, params, cfg), key), ids
    params = shard(params, m)
    adapter = jlora.init(key, params, cfg)
    adapter = jax.device_put(randomize(adapter, key), jlora.adapter_shardings(params, adapter))
    return params, adapter, jax.device_put(ids, NamedSharding(m, P("data", None)))


def sgd_step(params, adapter, ids):
    model = llama.Llama(CFG)
    loss = lambda ad: llama.loss_fn(jlora.apply(model.apply)(params, ad, ids[:, :-1]), ids[:, 1:])
    value, grads = jax.value_and_grad(loss)(adapter)
    return jax.tree.map(lambda a, g: a - 0.1 * g, adapter, grads), value


def test_adapter_shardings_follow_the_base(key, kind):
    params, adapter, _ = setup(key, mesh(kind=kind))
    layers = adapter["params"]["layers"]
    q, o = layers["self_attn"]["q_proj"]["kernel"], layers["self_attn"]["o_proj"]["kernel"]
    assert q.a.sharding.spec == P(None, None, None) and q.b.sharding.spec == P(None, None, "model")
    assert o.a.sharding.spec == P(None, "model", None) and o.b.sharding.spec == P(None, None, None)
    dora = jlora.init(key, params, jlora.LoraConfig(rank=4, targets=("q_proj",), dora=True))
    assert dora["params"]["layers"]["self_attn"]["q_proj"]["kernel"].magnitude.sharding.spec == P(
        None, "model"
    )


def quantize(params, variant):
    """The QLoRA variants' bases: ``qlora`` is NF4, ``qlora-int4`` etc. the other formats."""
    qtype = variant.partition("-")[2] or "nf4"
    return jlora.quantize(params, qtype=qtype, group_size=32 if qtype == "int4" else None)


@pytest.mark.parametrize(
    "variant", ["lora", "dora", "qlora", "qlora-int8", "qlora-int4", "qlora-fp8"]
)
def test_sharded_step_equals_one_device(key, variant, kind):
    lora = dict(dora=True) if variant == "dora" else {}
    params1, adapter1, ids1 = setup(key, **lora)
    params8, adapter8, ids8 = setup(key, mesh(kind=kind), **lora)
    if variant.startswith("qlora"):
        params1, params8 = quantize(params1, variant), quantize(params8, variant)
    new1, loss1 = jax.jit(sgd_step)(params1, adapter1, ids1)
    new8, loss8 = jax.jit(sgd_step)(params8, adapter8, ids8)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new8), jax.tree.leaves(new1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(new8), jax.tree.leaves(adapter8)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)  # the step keeps the layout


def _collectives(f, *args) -> list[tuple[str, int]]:
    """(collective, largest result element count) for each collective in the compiled HLO."""
    found = []
    for line in jax.jit(f).lower(*args).compile().as_text().splitlines():
        m = re.search(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if m:
            sizes = [
                int(np.prod([int(d) for d in dims.split(",") if d]))
                for dims in re.findall(r"\[([\d,]*)\]", m.group(1))
            ]
            found.append((m.group(2), max(sizes, default=1)))
    return found


def test_factored_path_keeps_the_base_sharding(key, kind):
    """No all-gather of anything weight-sized: the step communicates activations and
    rank-r products only, as the sharded base's own forward pass does."""
    params, adapter, ids = setup(key, mesh(kind=kind))
    model = llama.Llama(CFG)
    kernel = CFG.hidden_size * CFG.hidden_size  # the smallest per-layer kernel
    base = _collectives(lambda p, x: model.apply(p, x), params, ids)
    fwd = _collectives(lambda p, ad, x: jlora.apply(model.apply)(p, ad, x), params, adapter, ids)
    step = _collectives(sgd_step, params, adapter, ids)
    big = lambda found: [c for c in found if c[0] == "all-gather" and c[1] >= kernel]
    assert big(base) == big(fwd) == big(step) == []
    assert len(fwd) == len(base)  # XLA folds the rank-r all-reduces into the base's
    print(
        "collectives base forward:",
        sorted(base),
        "\nLoRA forward:",
        sorted(fwd),
        "\nLoRA step:",
        sorted(step),
    )


@pytest.mark.parametrize(
    "qtype", ["nf4", "int8", "int4", "fp8", "mxfp4", "nvfp4", "mxfp8", "fp8_block"]
)
def test_quantized_codes_are_split_like_the_weight(key, qtype, kind):
    """Each device stores its shard's codes and scales (the weight split 4 ways along its
    out axis), and a use yields the weight in its own spec."""
    w = jax.device_put(
        jax.random.normal(key, (256, 512)), NamedSharding(mesh(kind=kind), P(None, "model"))
    )
    node = jlora.quantize({"w": w}, qtype=qtype, compute_dtype=jnp.float32)["w"]
    per_device: dict = {}
    for a in jax.tree.leaves(node):
        for s in a.addressable_shards:
            per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
    assert max(per_device.values()) <= 0.26 * node.nbytes, max(per_device.values())
    got = jax.jit(jlora.dequantize)(node)
    want = jlora.dequantize(
        jlora.quantize({"w": np.asarray(w)}, qtype=qtype, compute_dtype=jnp.float32)["w"]
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert got.sharding.is_equivalent_to(w.sharding, 2)


@pytest.mark.parametrize(
    "variant",
    ["qlora", "qlora-int8", "qlora-int4", "qlora-fp8", "qlora-mxfp4", "qlora-nvfp4"]
    + ["qlora-mxfp8", "qlora-fp8_block"],
)
def test_quantized_step_gathers_no_weight(key, variant, kind):
    params, adapter, ids = setup(key, mesh(kind=kind))
    q = quantize(params, variant)
    kernel = CFG.hidden_size * CFG.hidden_size
    placed = jlora.init(key, q, jlora.LoraConfig.preset("complex", rank=8, alpha=16.0))
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(adapter)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)  # laid out as on the float base
    step = _collectives(sgd_step, q, adapter, ids)
    assert [c for c in step if c[0] == "all-gather" and c[1] >= kernel] == [], step


def test_checkpoint_restores_onto_another_mesh(key, tmp_path):
    params, adapter, ids = setup(key, mesh((2, 4)))
    tx = optax.adam(1e-3)
    state = {"adapter": adapter, "opt": tx.init(adapter)}
    jlora.save_checkpoint(tmp_path, 1, state)
    other = mesh((4, 2))
    params2 = shard(llama.init_params(CFG, key), other)
    like_ad = jlora.init(
        jax.random.key(5), params2, jlora.LoraConfig.preset("complex", rank=8, alpha=16.0)
    )
    like = {"adapter": like_ad, "opt": tx.init(like_ad)}
    restored, meta = jlora.restore_checkpoint(tmp_path, like)
    assert meta["step"] == 1
    for got, want, ref in zip(
        jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(like)
    ):
        np.testing.assert_array_equal(got, want)
        assert got.sharding.is_equivalent_to(ref.sharding, got.ndim)
        if isinstance(ref.sharding, NamedSharding):  # not Adam's step count
            assert got.sharding.mesh.devices.shape == (4, 2)


def test_a_weight_resharded_before_use_stays_factored(key, kind):
    """FSDP: a weight stored sharded on ``data`` is gathered where used
    (``with_sharding_constraint`` on an Auto mesh, ``reshard`` on an explicit one). The
    use stays factored (each factor constrained to its axes' entries, the rank axis
    replicated), equals the merged weight's (outputs and gradients, 1e-5), and adds no
    weight-sized all-gather to the base's own."""
    from conftest import check_against_materialized

    m = mesh(kind=kind)
    spec = P(None, "model")
    gather = (
        (lambda w: jax.lax.with_sharding_constraint(w, NamedSharding(m, spec)))
        if kind == "auto"
        else (lambda w: jax.sharding.reshard(w, spec))
    )
    fn = lambda p, x: jax.numpy.tanh(x @ gather(p["w"]))
    params = {
        "w": jax.device_put(
            jax.random.normal(key, (128, 256)) * 0.1, NamedSharding(m, P("data", "model"))
        )
    }
    x = jax.device_put(jax.random.normal(key, (8, 128)), NamedSharding(m, P("data", None)))
    cfg = jlora.LoraConfig(rank=8, targets=("w",))
    learned = jlora.init(key, params, cfg, fn, x)  # the probe follows the constraint
    assert (learned["w"].in_axes, learned["w"].axes_from) == ((0,), "fn")
    adapter = jax.device_put(randomize(learned, key), jlora.adapter_shardings(params, learned))
    assert jlora.explain(fn, params, adapter, x) == {"w": ["factored"]}
    check_against_materialized(fn, params, adapter, x)
    big = lambda found: [c for c in found if c[0] == "all-gather" and c[1] >= 128 * 256 // 8]
    base = _collectives(fn, params, x)
    lora = _collectives(lambda p, ad, x: jlora.apply(fn)(p, ad, x), params, adapter, x)
    assert len(big(lora)) == len(big(base))
