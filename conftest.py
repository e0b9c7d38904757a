"""Names the docstring examples in jlora/ use (pytest --doctest-modules), and the XLA
code generation the suite runs under."""

import os

#: The suite compiles a few thousand small programs and runs most of them once or twice, so
#: LLVM's optimization passes cost more than the code they speed up
#: (``benchmarks/codegen_level.py`` measures it). Level 0 changes only how XLA's CPU kernels
#: are generated, not the HLO (FLOPs, buffer sizes and fusions are the same), and every
#: tolerance holds at both levels. ``JLORA_TEST_XLA_OPT=default`` keeps XLA's default
#: (``.ci/run`` runs its JAX-flags step that way); set here, before any test starts JAX's
#: backend, and inherited by the tests' subprocesses.
if os.environ.get("JLORA_TEST_XLA_OPT") != "default":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import jlora  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(jax=jax, jnp=jnp, jlora=jlora, optax=optax)
