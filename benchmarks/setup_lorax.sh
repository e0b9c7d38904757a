#!/usr/bin/env bash
# lorax (jax-lorax 0.3.1) imports jax.linear_util, which JAX removed after 0.4.23:
# give it its own virtual environment for benchmarks/peers.py.
set -euo pipefail
venv="$(dirname "$0")/.venv-lorax"
python -m venv "$venv"
"$venv/bin/pip" install -q "jax==0.4.23" "jaxlib==0.4.23" "jax-lorax==0.3.1" "flax==0.8.2" \
  "optax==0.2.2" "numpy<2" "ml_dtypes<0.5" "scipy<1.13"
echo "lorax venv ready: $venv"
