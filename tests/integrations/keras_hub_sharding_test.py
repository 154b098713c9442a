"""A sparsified keras-hub backbone shards its experts with the layout map.

Runs in a process of its own with 8 virtual CPU devices (JAX, whose device
count is fixed when it starts). Written against the contract's
`keras_moe.distribution.layout_map` / `expert_parallel`; skipped until that
module exists.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("keras_hub")
pytest.importorskip("keras_moe.distribution")

import keras  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import keras
    from keras import ops

    from keras_moe import distribution as moe_distribution
    from keras_moe.integrations.keras_hub import sparsify
    from tests.integrations import hub_models

    devices = keras.distribution.list_devices()
    assert len(devices) == 8, devices
    mesh = keras.distribution.DeviceMesh((2, 4), axis_names=("batch", "expert"), devices=devices)

    results = {}
    # After sparsify every family holds the same stacked expert variables;
    # Mixtral (SparseMoE) and Gemma 4 (the MoE core with its own router) cover
    # both converted layer types.
    for family in ("mixtral", "gemma4"):
        make = hub_models.MOE_FAMILIES[family][0]
        x = hub_models.inputs(family)
        reference = make()
        hub_models.redraw_moe_weights(reference)
        weights = reference.get_weights()
        sparsify(reference)
        expected = ops.convert_to_numpy(reference(x))

        with moe_distribution.expert_parallel(
            mesh, expert_axis="expert", batch_axis="batch"
        ).scope():
            backbone = make()
            backbone.set_weights(weights)
            sparsify(backbone)
        kernels = [
            v for v in backbone.weights
            if v.path.split("/")[-2:-1] == ["experts"] and v.path.endswith("_kernel")
        ]
        assert kernels, family
        for variable in kernels:
            spec = tuple(variable.value.sharding.spec)
            # Sharded on the leading expert dimension, the rest unsharded.
            assert spec[0] == "expert" and all(s is None for s in spec[1:]), (variable.path, spec)
            shards = variable.value.addressable_shards
            assert {tuple(s.data.shape)[0] for s in shards} == {variable.shape[0] // 4}
        outputs = ops.convert_to_numpy(backbone(x))
        real = x["padding_mask"].astype(bool)
        np.testing.assert_allclose(outputs[real], expected[real], atol=1e-4, rtol=0)
        results[family] = len(kernels)
    print("SHARDED", results)
    """
)


def test_sparsified_backbones_shard_their_experts():
    if keras.backend.backend() != "jax":
        pytest.skip("Keras' distribution API shards variables on the JAX backend.")
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        # Keeps this process's compilation flags (tests/conftest.py).
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
        PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "SHARDED" in result.stdout
