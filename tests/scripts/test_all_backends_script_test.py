"""`scripts/test-all-backends.sh` reports every backend, even after a crash."""

import os
import pathlib
import subprocess
import sys

import keras
import pytest

SCRIPT = pathlib.Path(__file__).parents[2] / "scripts" / "test-all-backends.sh"

# Outside the repository, so that neither its conftest (Keras) nor its pytest
# configuration is loaded: each backend's run takes a fraction of a second.
FAKE_SUITE = """
import os
import signal


def test_backend():
    backend = os.environ["KERAS_BACKEND"]
    if backend == "crashing":
        os.kill(os.getpid(), signal.SIGSEGV)
    assert backend != "failing"
"""


# The script and these fake backends do not depend on the backend under test:
# run once, in the JAX process, instead of three times.
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="backend-independent; runs in the JAX process"
)


def _run(tmp_path, backends, jobs=1):
    (tmp_path / "fake_test.py").write_text(FAKE_SUITE)
    env = dict(os.environ, KERAS_MOE_BACKENDS=backends, PYTHON=sys.executable)
    return subprocess.run(
        ["bash", str(SCRIPT), "--jobs", str(jobs), str(tmp_path / "fake_test.py"), "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _summary(stdout):
    lines = stdout.splitlines()
    start = lines.index("=== Summary (one process per backend)")
    # One line per process, in the order listed, then the total.
    assert "s wall in all, up to " in lines[-1]
    return {line.split()[0]: line for line in lines[start + 1 : -1]}


@pytest.mark.parametrize("jobs", [1, 3])
def test_a_crash_does_not_hide_the_other_backends(tmp_path, jobs):
    result = _run(tmp_path, "crashing failing passing", jobs)
    assert result.returncode == 1, result.stdout + result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("=== KERAS_BACKEND")]
    expected = ["=== KERAS_BACKEND=crashing", "=== KERAS_BACKEND=failing", "=== KERAS_BACKEND=passing"]
    if jobs == 1:
        # Every backend ran, in order, after the one that crashed.
        assert headers == expected
    else:
        # All at once: each process's whole log under its header, as it ends.
        assert sorted(headers) == expected
        logs = result.stdout.split("=== ")
        assert any(log.startswith("KERAS_BACKEND=crashing") and "Segmentation fault" in log for log in logs)
        assert any(log.startswith("KERAS_BACKEND=passing") and "1 passed" in log for log in logs)
    summary = _summary(result.stdout)
    assert list(summary) == ["crashing", "failing", "passing"]
    assert "crashed (signal 11, SIGSEGV; exit 139)" in summary["crashing"]
    assert "failed (some tests failed)" in summary["failing"]
    assert "passed" in summary["passing"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_exits_zero_when_every_backend_passes(tmp_path, jobs):
    result = _run(tmp_path, "passing", jobs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in _summary(result.stdout)["passing"]


def test_refuses_a_bad_job_count(tmp_path):
    result = _run(tmp_path, "passing", "none")
    assert result.returncode == 4
    assert "--jobs (or KERAS_MOE_TEST_JOBS) must be a positive integer, got 'none'" in result.stderr
