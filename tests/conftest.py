"""Shared test setup: one process per backend, chosen by KERAS_BACKEND."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests run tiny shapes, where one thread is fastest; and with more than
# one, PyTorch's OpenMP threads spin while they wait for a core: on a busy
# machine (CI has two cores, and runs processes side by side) its suite took
# 2.5 times the CPU time.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _compile_fast_on_jax():
    """Asks XLA for quick compilation instead of fast code, under JAX.

    Compiling was nearly 90% of the JAX suite's time: eager JAX compiles
    every operation anew for each new shape, and every model compiles its
    train and predict steps, while the programs then run on a few tokens.
    Without XLA's optimizations (LLVM at -O3, the MLIR fusion emitters) its
    backend compiles in 180 s instead of 630 s, and the whole suite takes
    7 minutes of CPU time instead of 15. They change how fast the tiny
    programs run and at most the last bits of their rounding; the tests'
    tolerances are the same. KERAS_MOE_TEST_XLA_DEFAULTS=1 tests with XLA's
    defaults.
    """
    if os.environ["KERAS_BACKEND"] != "jax" or os.environ.get("KERAS_MOE_TEST_XLA_DEFAULTS"):
        return
    from importlib import metadata

    try:
        jaxlib = tuple(int(part) for part in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        jaxlib = (0, 0)
    flags = os.environ.get("XLA_FLAGS", "")
    # An XLA flag that this jaxlib does not know aborts the process: older
    # jaxlibs, which may lack it, keep their default. XLA reads the flags
    # when JAX first uses its CPU backend, after this.
    if jaxlib >= (0, 7) and "xla_cpu_use_fusion_emitters" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_use_fusion_emitters=false".strip()

    # LLVM at -O0, without its expensive passes: for this process (JAX may
    # be imported already; it reads the setting at each compilation) and
    # for the processes that tests start.
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    import jax

    jax.config.update("jax_disable_most_optimizations", True)


_compile_fast_on_jax()

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


def _reset_layer_names():
    try:
        from keras.src.utils.naming import reset_uids
    except ImportError:  # Keras moved it: the public way, slower on TensorFlow
        keras.backend.clear_session(free_memory=False)
    else:
        reset_uids()


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Each test starts from float32, a fixed seed and fresh layer names.

    The experts' initializers derive their seeds from the layers' automatic
    names (`sparse_moe_3`): restarting the names makes a test's weights
    independent of which tests ran before it in the same process.
    """
    _reset_layer_names()
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
    keras.config.set_dtype_policy("float32")
