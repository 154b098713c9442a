"""Shared test setup: one process per backend, chosen by KERAS_BACKEND."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
# Keep thread pools small: CI has two cores and runs one backend at a time.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hypothesis  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# CI and the README's test command run one fixed set of examples: seeded from
# each test's name (derandomize), with no example database read or written.
# Inputs that once failed are pinned with @example in the tests themselves.
hypothesis.settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
# Opt-in search for new failures (`HYPOTHESIS_PROFILE=explore`): random, more
# examples, and the property tests draw shapes from whole ranges. Failures are
# saved under .hypothesis/ and replayed first on the next run; pin each with
# @example once understood.
hypothesis.settings.register_profile(
    "explore",
    max_examples=200,
    deadline=None,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend: {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Each test starts from the float32 policy and a fixed seed."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
    keras.config.set_dtype_policy("float32")
