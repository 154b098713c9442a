"""Multi-task models saved before the layers' refactor load on every backend.

The fixtures (`tests/data/multitask_*`, written by
`tests/data/make_multitask_fixtures.py`) hold MMoE, CGC, PLE and a
`MultiTaskModel` saved with the layers as they were before they moved onto
one base class: their registered names, config keys and variable paths must
keep loading, with the same outputs.
"""

import os

import keras
import numpy as np
import pytest

import keras_moe

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
BACKENDS = ["jax", "tensorflow", "torch"]


def _load(name):
    return keras.models.load_model(os.path.join(DATA, name))


@pytest.mark.parametrize("saved_on", BACKENDS)
def test_multitask_layers_saved_before_the_refactor_load(saved_on):
    model = _load(f"multitask_layers_{saved_on}.keras")
    assert isinstance(model.get_layer("mmoe"), keras_moe.layers.MMoE)
    assert isinstance(model.get_layer("lower"), keras_moe.layers.CGC)
    assert isinstance(model.get_layer("ple"), keras_moe.layers.PLE)
    data = np.load(os.path.join(DATA, f"multitask_{saved_on}.npz"))
    outputs = model(data["x"])
    assert len(outputs) == len([k for k in data if k.startswith("layers_")])
    for i, y in enumerate(outputs):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(y), data[f"layers_{i}"], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("saved_on", BACKENDS)
def test_multi_task_model_saved_before_the_refactor_loads(saved_on):
    model = _load(f"multitask_model_{saved_on}.keras")
    assert isinstance(model, keras_moe.models.MultiTaskModel)
    assert isinstance(model.mixture, keras_moe.layers.PLE)
    data = np.load(os.path.join(DATA, f"multitask_{saved_on}.npz"))
    outputs = model.predict(data["x"], verbose=0)
    assert list(outputs) == model.task_names
    for name, y in outputs.items():
        np.testing.assert_allclose(y, data[f"model_{name}"], rtol=1e-5, atol=1e-6)
