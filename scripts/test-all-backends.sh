#!/usr/bin/env bash
# Runs the test suite once per Keras backend, each in its own process.
# Extra arguments go to pytest, e.g. `bash scripts/test-all-backends.sh tests/layers -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
for backend in ${KERAS_MOE_BACKENDS:-jax tensorflow torch}; do
  echo "=== KERAS_BACKEND=${backend}"
  KERAS_BACKEND="${backend}" python -m pytest -p no:cacheprovider "$@"
done
