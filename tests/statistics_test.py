"""routing_stats: every routed layer of a model, nested ones included, by name."""

import keras
import numpy as np

import keras_moe
from keras_moe.callbacks import RouterMonitor
from tests.callbacks.models import data


class SlotsLayer(keras.layers.Layer):
    """A stand-in for a layer of another kind that adopts the statistics protocol."""

    def call(self, inputs):
        return inputs

    def routing_statistics(self):
        return {"expert_load": np.full(2, 0.5), "slot_entropy": 0.25, "aux_losses": {},
                "training_steps": 3}


def _block(name):
    inputs = keras.Input((6, 4))
    return keras.Model(inputs, keras_moe.layers.SparseMoE(4, 6, name="moe")(inputs), name=name)


def test_nested_models_and_shared_names():
    inputs = keras.Input((6, 4))
    hidden = _block("block_0")(inputs)
    hidden = _block("block_1")(hidden)
    outputs = keras_moe.layers.SwitchFFN(4, 6, name="switch")(SlotsLayer(name="slots")(hidden))
    model = keras.Model(inputs, outputs)
    model(np.ones((2, 6, 4), "float32"), training=True)
    stats = keras_moe.routing_stats(model)
    assert list(stats) == ["block_0/moe", "block_1/moe", "slots", "switch"]
    assert stats["block_1/moe"]["assignment_counts"].sum() == 24  # 12 tokens, top-2
    assert stats["switch"]["assignment_counts"].sum() == 12  # top-1
    assert stats["slots"]["slot_entropy"] == 0.25


def test_a_layer_of_another_kind_reaches_the_monitor():
    inputs = keras.Input((6, 4))
    model = keras.Model(inputs, SlotsLayer(name="slots")(keras.layers.Dense(4)(inputs)))
    model.compile("sgd", "mse")
    x, y = data(batches=1)
    monitor = RouterMonitor()
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[monitor])
    assert history.history["slots/slot_entropy"] == [0.25, 0.25]
    np.testing.assert_array_equal(monitor.history["slots"]["expert_load"][-1], [0.5, 0.5])


def test_a_model_without_routed_layers():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert keras_moe.routing_stats(model) == {}


def test_every_routed_layer_kind_reports():
    """SparseMoE, ExpertChoiceMoE (the MoE core) and SoftMoE (soft load) all report."""
    inputs = keras.Input((6, 4))
    hidden = keras_moe.layers.ExpertChoiceMoE(4, 6, name="choice")(inputs)
    outputs = keras_moe.layers.SoftMoE(4, 2, 6, name="soft")(hidden)
    model = keras.Model(inputs, outputs)
    model(np.random.default_rng(0).standard_normal((2, 6, 4)).astype("float32"), training=True)
    stats = keras_moe.routing_stats(model)
    assert set(stats) == {"choice", "soft"}
    for name in ("choice", "soft"):
        np.testing.assert_allclose(stats[name]["expert_load"].sum(), 1.0, rtol=1e-6)
    assert stats["soft"]["dropped_fraction"] == 0.0
