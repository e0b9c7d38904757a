"""Train an adapter on a sharded base: data x model mesh, Megatron layout, jit does the rest.

Run: python examples/train_sharded.py [--auto]   (8 virtual CPU devices, about 15 s)

The mesh has JAX's default explicit axes (every array's type carries its
sharding, entered with ``jax.set_mesh``); ``--auto`` uses ``AxisType.Auto`` axes
(XLA's GSPMD propagation) instead. Both train the same adapter.

The base is sharded tensor-parallel (q/k/v/gate/up/lm_head column-parallel,
o/down row-parallel on "model") and the batch data-parallel (on "data");
``jlora.init`` places each adapter factor after its kernel (``a`` follows the
kernel's "in" sharding, ``b`` its "out"), and the jitted step keeps that
layout. On a TPU/GPU cluster the same code runs once per host after
``jax.distributed.initialize()``, with the mesh over ``jax.devices()``.
"""

import os
import sys
import time

# 8 CPU devices, unless the caller set a device count (other XLA flags are kept)
if "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
    ).strip()

import jax  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama  # noqa: E402

import jlora  # noqa: E402

STEPS, BATCH, SEQ = 200, 16, 16


def main(auto: bool = False):
    n = jax.device_count()
    model_axis = 4 if n % 4 == 0 else 1
    kind = AxisType.Auto if auto else AxisType.Explicit
    mesh = jax.make_mesh((n // model_axis, model_axis), ("data", "model"), axis_types=(kind,) * 2)
    with jax.set_mesh(mesh):
        return train(mesh)


def train(mesh):
    n = jax.device_count()
    cfg = llama.LlamaConfig(vocab_size=16)
    model, key = llama.Llama(cfg), jax.random.key(0)
    params = jax.tree_util.tree_map_with_path(
        lambda kp, x: jax.device_put(
            x, NamedSharding(mesh, llama.megatron_spec(jlora.path_str(kp), x.ndim))
        ),
        llama.init_params(cfg, key),
    )
    adapter = jlora.init(key, params, jlora.LoraConfig.preset("complex"))  # placed like the base
    tx = jlora.loraplus(optax.adamw, learning_rate=5e-4)
    opt_state = tx.init(adapter)
    print(
        f"mesh {dict(mesh.shape)} on {n} {jax.devices()[0].platform} devices, "
        f"{mesh.axis_types[0].name} axes"
    )
    for name, kind in (("q_proj", "column"), ("o_proj", "row")):
        w = params["params"]["layers"]["self_attn"][name]["kernel"]
        node = adapter["params"]["layers"]["self_attn"][name]["kernel"]
        print(
            f"{name} ({kind}-parallel): kernel {w.sharding.spec}, a {node.a.sharding.spec}, "
            f"b {node.b.sharding.spec}"
        )

    def batch(i):
        """Digits then the same digits reversed; the batch is sharded over "data"."""
        digits = jax.random.randint(jax.random.fold_in(key, i), (BATCH, SEQ // 2), 0, 10)
        ids = jax.numpy.concatenate([digits, digits[:, ::-1]], axis=1)
        return jax.device_put(ids, NamedSharding(mesh, P("data", None)))

    @jax.jit
    def step(adapter, opt_state, ids):
        loss = lambda ad: llama.loss_fn(
            jlora.apply(model.apply)(params, ad, ids[:, :-1])[:, SEQ // 2 :], ids[:, SEQ // 2 + 1 :]
        )
        value, grads = jax.value_and_grad(loss)(adapter)
        updates, opt_state = tx.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, value

    t0 = time.perf_counter()
    for i in range(STEPS):
        adapter, opt_state, value = step(adapter, opt_state, batch(i))
        if i % 40 == 0 or i == STEPS - 1:
            print(f"step {i:3d}  loss {float(value):.3f}")
    q = adapter["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    print(
        f"after training b keeps its layout: {q.b.sharding.spec}; {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(auto="--auto" in sys.argv[1:]))
