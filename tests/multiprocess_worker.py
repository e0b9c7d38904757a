"""One process of a data-parallel jlora run: ``python multiprocess_worker.py ADDRESS
NUM_PROCESSES PROCESS_ID OUT.npz``. ``test_sharding.py`` runs it as 2 processes and
as 1, and compares the adapters. The same script runs on a multi-host TPU/GPU
cluster: every host runs it with its own PROCESS_ID (or no arguments at all
where ``jax.distributed.initialize()`` finds the cluster itself).
"""

import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU needs a backend

import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import llama  # noqa: E402

import jlora  # noqa: E402

STEPS, BATCH = 3, 8


def main(address: str, n: int, pid: int, out: str) -> None:
    jax.distributed.initialize(address, num_processes=n, process_id=pid)
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2)
    model, key = llama.Llama(cfg), jax.random.key(0)
    params = llama.init_params(cfg, key)  # same on every process (same key)
    adapter = jlora.init(key, params, jlora.LoraConfig.preset("general"))
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    replicated, by_example = NamedSharding(mesh, P()), NamedSharding(mesh, P("data", None))
    params, adapter = jax.device_put((params, adapter), replicated)

    @jax.jit
    def step(adapter, ids):
        loss = lambda ad: llama.loss_fn(
            jlora.apply(model.apply)(params, ad, ids[:, :-1]), ids[:, 1:]
        )
        grads = jax.grad(loss)(adapter)  # averaged over the global batch by XLA
        return jax.tree.map(lambda a, g: a - 0.5 * g, adapter, grads)

    per = BATCH // n
    for i in range(STEPS):
        ids = np.asarray(jax.random.randint(jax.random.fold_in(key, i), (BATCH, 9), 0, 64))
        local = ids[pid * per : (pid + 1) * per]  # this process's share of the global batch
        adapter = step(adapter, jax.make_array_from_process_local_data(by_example, local))
    if pid == 0:
        leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(adapter)]
        np.savez(out, *leaves)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
