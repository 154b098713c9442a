"""RouterMonitor: figures in batch and epoch logs (measured against recounts), alarms."""

import csv
import glob
import os
import warnings

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe.callbacks import RouterMonitor
from tests.callbacks.models import Recorder
from tests.callbacks.models import data
from tests.callbacks.models import moe_model

FIGURES = ("dropped_fraction", "load_max_mean_ratio", "router_entropy", "router_confidence",
           "load_balance_loss", "z_loss")


def test_batch_and_epoch_figures_match_a_recount():
    """Each batch's logged figures are that batch's statistics; epochs log their mean."""
    model = moe_model(capacity_factor=0.75, router_z_loss_weight=1e-3)
    x, y = data(batches=3)
    monitor, recorder = RouterMonitor(log_expert_load=True, max_dropped_fraction=None), Recorder()
    model.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0, callbacks=[monitor, recorder])
    layer = model.get_layer("moe")
    expected = []
    for b in range(3):
        layer(x[2 * b: 2 * b + 2], training=True)  # the same weights: the learning rate is 0
        expected.append(layer.routing_statistics())
    for epoch in range(2):
        logged = recorder.batches[3 * epoch: 3 * epoch + 3]
        for stats, logs in zip(expected, logged):
            for name in FIGURES[:4]:
                np.testing.assert_allclose(logs[f"moe/{name}"], stats[name], rtol=1e-5, err_msg=name)
            for loss in ("load_balance", "z"):
                np.testing.assert_allclose(logs[f"moe/{loss}_loss"], stats["aux_losses"][loss], rtol=1e-5)
            np.testing.assert_allclose([logs[f"moe/load_{e}"] for e in range(4)], stats["expert_load"],
                                       rtol=1e-6)
        for name in FIGURES:
            np.testing.assert_allclose(
                recorder.epochs[epoch][f"moe/{name}"],
                np.mean([logs[f"moe/{name}"] for logs in logged]), rtol=1e-6,
            )
        np.testing.assert_allclose(monitor.history["moe"]["expert_load"][epoch],
                                   np.mean([s["expert_load"] for s in expected], axis=0), rtol=1e-6)
    assert any(s["dropped_fraction"] > 0 for s in expected)


def test_figures_reach_history_csv_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    import tensorflow as tf

    model = moe_model(capacity_factor=1.0)
    x, y = data(batches=2)
    log_dir, csv_path = str(tmp_path / "tb"), str(tmp_path / "log.csv")
    history = model.fit(
        x, y, batch_size=2, epochs=2, verbose=0,
        callbacks=[RouterMonitor(max_dropped_fraction=None),
                   keras.callbacks.CSVLogger(csv_path),
                   keras.callbacks.TensorBoard(log_dir, update_freq="batch")],
    )
    for name in FIGURES[:5]:
        assert len(history.history[f"moe/{name}"]) == 2, name
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_allclose([float(r["moe/router_entropy"]) for r in rows],
                               history.history["moe/router_entropy"], rtol=1e-6)
    scalars = {}
    for path in glob.glob(os.path.join(log_dir, "train", "events*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag != "keras":  # the model's config, as text
                    scalars.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    np.testing.assert_allclose(scalars["epoch_moe/load_max_mean_ratio"],
                               history.history["moe/load_max_mean_ratio"], rtol=1e-6)
    assert len(scalars["batch_moe/dropped_fraction"]) == 4


def test_update_freq_reads_every_nth_batch():
    model = moe_model()
    x, y = data(batches=3)
    recorder = Recorder()
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0,
              callbacks=[RouterMonitor(update_freq=2), recorder])
    assert [("moe/router_entropy" in logs) for logs in recorder.batches] == [False, True, False]
    assert recorder.epochs[0]["moe/router_entropy"] == recorder.batches[1]["moe/router_entropy"]


def test_collapse_alarm_after_patience():
    model = moe_model(top_k=1, router_bias=True)
    # Every token to expert 0 (the frozen optimizer keeps it there).
    model.get_layer("moe").router.bias.assign(np.array([20.0, 0.0, 0.0, 0.0], "float32"))
    x, y = data(batches=2)
    monitor = RouterMonitor(collapse_patience=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[monitor])
    assert not [w for w in caught if "RouterMonitor" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[monitor])
    alarms = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(alarms) == 3  # experts 1, 2 and 3, once each
    for expert, alarm in zip((1, 2, 3), alarms):
        assert f"expert {expert} of layer 'moe'" in alarm and "for 2 epochs" in alarm
    np.testing.assert_array_equal(monitor.history["moe"]["expert_load"][-1], [1, 0, 0, 0])
    assert monitor.history["moe"]["load_max_mean_ratio"] == [4.0, 4.0]


def test_drop_alarm():
    model = moe_model(capacity_factor=0.25)
    x, y = data(batches=1)
    with pytest.warns(RuntimeWarning, match=r"dropped \d+\.\d% of its assignments .*limit 10\.0%"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[RouterMonitor()])


def test_watches_the_named_layers_only():
    inputs = keras.Input((6, 4))
    hidden = keras_moe.layers.SparseMoE(4, 6, name="first")(inputs)
    outputs = keras_moe.layers.SwitchFFN(4, 6, name="second")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile("sgd", "mse")
    x, y = data(batches=1)
    history = model.fit(x, y, epochs=1, verbose=0, callbacks=[RouterMonitor(layers="second")])
    assert "second/dropped_fraction" in history.history
    assert not [key for key in history.history if key.startswith("first/")]
    with pytest.raises(ValueError, match="'third'.*Routed layers: \\['first', 'second'\\]"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[RouterMonitor(layers=["third"])])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"update_freq": 0}, "update_freq"),
        ({"collapse_threshold": 1.5}, "collapse_threshold"),
        ({"collapse_patience": 0}, "collapse_patience"),
        ({"max_dropped_fraction": -0.1}, "max_dropped_fraction"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        RouterMonitor(**kwargs)
