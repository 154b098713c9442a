"""keras_moe.plot: PNG files from a monitor, a routing dict or records; matplotlib optional."""

import sys

import numpy as np
import pytest

import keras_moe
from keras_moe import plot
from keras_moe.callbacks import RouterMonitor
from tests.callbacks.models import data
from tests.callbacks.models import moe_model

PNG = b"\x89PNG"

pytest.importorskip("matplotlib")


def _np(x):
    import keras

    return keras.ops.convert_to_numpy(x)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(4) == PNG


def test_plots_from_a_monitor_and_a_routing_dict(tmp_path):
    model = moe_model(capacity_factor=0.5)
    x, y = data(batches=2)
    monitor = RouterMonitor(max_dropped_fraction=None)
    model.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[monitor])
    plot.plot_expert_load(monitor, path=str(tmp_path / "load.png"), title="load")
    plot.plot_dropped_fraction(monitor, path=str(tmp_path / "dropped.png"))
    _, routing = model.get_layer("moe")(x[:2], training=True, return_routing=True)
    mask = np.ones((2, 6), bool)
    mask[1, 3:] = False
    figure = plot.plot_token_assignment(routing, mask=mask, max_tokens=10,
                                        path=str(tmp_path / "tokens.png"))
    for name in ("load", "dropped", "tokens"):
        assert _is_png(tmp_path / f"{name}.png"), name
    # An (experts, tokens) chart holding the served assignments of real tokens.
    image = np.ma.filled(figure.axes[0].images[0].get_array(), np.nan)
    assert image.shape == (4, 10)
    dispatched = _np(routing["dispatched"]).reshape(-1, 2)[:10] & mask.reshape(-1)[:10, None]
    assert np.isfinite(image).sum() == dispatched.sum()


def test_runs_side_by_side_from_records(tmp_path):
    records = {
        "collapsed": {"expert_load": [np.array([1.0, 0, 0, 0])] * 3},
        "balanced": {"expert_load": [np.full(4, 0.25)] * 3},
    }
    figure = plot.plot_expert_load(records, path=str(tmp_path / "side.png"))
    assert [ax.get_title() for ax in figure.axes[:2]] == ["collapsed", "balanced"]
    assert _is_png(tmp_path / "side.png")
    with pytest.raises(ValueError, match="No 'dropped_fraction' recorded"):
        plot.plot_dropped_fraction(records)
    with pytest.raises(ValueError, match="not in the records"):
        plot.plot_expert_load(records, layers=["other"])
    with pytest.raises(ValueError, match="has seen training"):
        plot.plot_expert_load(RouterMonitor())


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match='pip install "keras-moe\\[plot\\]"'):
        keras_moe.plot.plot_expert_load({"a": {"expert_load": [np.ones(2) / 2]}})
