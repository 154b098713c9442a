#!/usr/bin/env bash
# The multi-device tests of tests/distribution, each backend in a process of its
# own: JAX and TensorFlow fix their device configuration when they start, so
# the normal suite (scripts/test-all-backends.sh) skips these tests.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "=== KERAS_BACKEND=jax, 8 host devices"
XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8" \
  KERAS_BACKEND=jax python -m pytest -p no:cacheprovider tests/distribution/expert_parallel_test.py "$@"
echo "=== KERAS_BACKEND=tensorflow, 8 logical CPU devices (DTensor)"
KERAS_MOE_TF_LOGICAL_CPUS=8 KERAS_BACKEND=tensorflow \
  python -m pytest -p no:cacheprovider tests/distribution/dtensor_test.py "$@"
