"""Multi-device tests run in a process of their own.

JAX reads `XLA_FLAGS=--xla_force_host_platform_device_count=8` and
TensorFlow its logical-device configuration once, before their first
computation, so these tests need a fresh process: `scripts/test-distribution.sh`
(JAX with 8 host devices; TensorFlow with `KERAS_MOE_TF_LOGICAL_CPUS=8`).
Elsewhere the tests marked `multi_device` are skipped; the rest (layout
rules, argument errors) run everywhere.
"""

import os

import keras
import pytest

DEVICES = 8


def _configure_tensorflow():
    """Splits the CPU into logical devices before TensorFlow starts."""
    count = int(os.environ.get("KERAS_MOE_TF_LOGICAL_CPUS", "0"))
    if keras.backend.backend() != "tensorflow" or count < 2:
        return
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError:  # already initialized: the tests skip themselves
        pass


_configure_tensorflow()


def device_count():
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.device_count()
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_logical_devices("CPU"))
    return 1


def pytest_collection_modifyitems(config, items):
    if device_count() >= DEVICES:
        return
    skip = pytest.mark.skip(
        reason=f"needs {DEVICES} devices in a process of its own: run scripts/test-distribution.sh"
    )
    for item in items:
        if "multi_device" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "multi_device: needs 8 (virtual) devices; see tests/distribution/conftest.py"
    )
