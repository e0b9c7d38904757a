"""Names the docstring examples in jlora/ use (pytest --doctest-modules)."""

import jax
import jax.numpy as jnp
import optax
import pytest

import jlora


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(jax=jax, jnp=jnp, jlora=jlora, optax=optax)
