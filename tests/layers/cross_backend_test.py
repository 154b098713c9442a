"""Models saved on one backend load on every other with the same outputs."""

import os

import keras
import numpy as np
import pytest

import keras_moe

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


@pytest.mark.parametrize("saved_on", ["jax", "tensorflow", "torch"])
def test_load_model_saved_on_another_backend(saved_on):
    model = keras.models.load_model(os.path.join(DATA, f"sparse_moe_{saved_on}.keras"))
    assert isinstance(model.get_layer("moe"), keras_moe.layers.SparseMoE)
    assert isinstance(model.get_layer("switch"), keras_moe.layers.SwitchFFN)
    data = np.load(os.path.join(DATA, f"sparse_moe_{saved_on}.npz"))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(data["x"])), data["y"], rtol=1e-5, atol=1e-5
    )
