"""Routing statistics of the MoE layer core: recounts, masking, windows, loading."""

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe.experts import StackedExperts
from keras_moe.layers import MoE
from keras_moe.layers import SparseMoE
from keras_moe.layers.moe import TRAINING_STATISTICS
from tests.layers.moe_test import HashRouter

HIDDEN = 4


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _inputs(shape=(2, 6, HIDDEN), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _recount(layer, routing, mask):
    """The statistics, recomputed in NumPy from `return_routing` and the mask."""
    num_experts = layer.num_experts
    real = np.ones(routing["expert_indices"].shape[:-1], bool) if mask is None else mask
    indices = _np(routing["expert_indices"])[real]  # (N, k)
    dispatched = _np(routing["dispatched"])[real]
    probs = _softmax(_np(routing["router_logits"])[real].astype("float64"))  # (N, E)
    counts = np.bincount(indices.ravel(), minlength=num_experts).astype("float64")
    served = np.bincount(indices[dispatched], minlength=num_experts)
    entropy = -(probs * np.log(probs)).sum(-1)
    return {
        "assignment_counts": counts,
        "expert_load": counts / counts.sum(),
        "served": served,
        "load_max_mean_ratio": counts.max() / counts.mean(),
        "dropped_fraction": 1.0 - dispatched.sum() / dispatched.size,
        "router_entropy": entropy.mean(),
        "router_confidence": probs.max(-1).mean(),
    }


MASK = np.array([[1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1]], bool)


@pytest.mark.parametrize(
    "kwargs, mask",
    [
        ({}, None),
        ({}, MASK),
        ({"capacity_factor": 0.5}, MASK),
        ({"capacity_factor": 0.75, "group_size": 5, "top_k": 1}, None),
    ],
    ids=["dropless", "dropless-masked", "capacity-masked", "groups-padded"],
)
def test_counts_equal_a_recount_from_return_routing(kwargs, mask):
    layer = SparseMoE(4, 6, router_z_loss_weight=1e-3, **kwargs)
    x = _inputs()
    _, routing = layer(x, training=True, mask=mask, return_routing=True)
    stats = layer.routing_statistics()
    expected = _recount(layer, routing, mask)
    np.testing.assert_array_equal(stats["assignment_counts"], expected["assignment_counts"])
    np.testing.assert_array_equal(_np(layer.expert_counts), expected["served"])
    np.testing.assert_allclose(stats["expert_load"], expected["expert_load"], rtol=1e-6)
    for name in ("load_max_mean_ratio", "dropped_fraction", "router_entropy", "router_confidence"):
        np.testing.assert_allclose(stats[name], expected[name], rtol=1e-5, err_msg=name)
    if "capacity_factor" in kwargs:
        assert stats["dropped_fraction"] > 0
    # The auxiliary losses, unweighted, as the library's loss functions give them.
    real = None if mask is None else mask
    logits = _np(routing["router_logits"])
    probs = keras.ops.softmax(logits, axis=-1)
    lb = keras_moe.losses.load_balancing_loss(probs, routing["expert_indices"], mask=real)
    z = keras_moe.losses.router_z_loss(logits, mask=real)
    np.testing.assert_allclose(stats["aux_losses"]["load_balance"], float(_np(lb)), rtol=1e-5)
    np.testing.assert_allclose(stats["aux_losses"]["z"], float(_np(z)), rtol=1e-5)
    assert stats["training_steps"] == 1


def test_any_router_counts_the_same_way():
    layer = MoE(HashRouter(3), StackedExperts(3, 5), capacity_factor=1.0)
    x = _inputs((1, 7, HIDDEN))
    _, routing = layer(x, training=True, return_routing=True)
    stats = layer.routing_statistics()
    np.testing.assert_array_equal(stats["assignment_counts"], [3, 2, 2])
    assert stats["aux_losses"] == {}  # the hash router defines no loss
    np.testing.assert_allclose(stats["router_entropy"], _recount(layer, routing, None)["router_entropy"],
                               rtol=1e-5)


def test_masked_tokens_are_left_out():
    """A masked batch has the statistics of its real tokens alone."""
    x = _inputs()
    masked = SparseMoE(4, 6, router_z_loss_weight=1e-3, seed=1)
    masked(x, training=True, mask=MASK)
    alone = SparseMoE.from_config(masked.get_config())
    alone.build(x.shape)
    alone.set_weights(masked.get_weights())
    alone(x[MASK][None], training=True)
    a, b = masked.routing_statistics(), alone.routing_statistics()
    np.testing.assert_array_equal(a["assignment_counts"], b["assignment_counts"])
    for name in ("router_entropy", "router_confidence", "load_max_mean_ratio"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, err_msg=name)
    for name in ("load_balance", "z"):
        np.testing.assert_allclose(a["aux_losses"][name], b["aux_losses"][name], rtol=1e-5)


def test_only_training_calls_update_the_statistics():
    layer = SparseMoE(4, 6)
    layer(_inputs(seed=0), training=True)
    before = layer.routing_statistics()
    served_before = _np(layer.expert_counts)
    layer(_inputs(seed=1))
    after = layer.routing_statistics()
    np.testing.assert_array_equal(after["assignment_counts"], before["assignment_counts"])
    assert after["router_entropy"] == before["router_entropy"]
    assert after["training_steps"] == 1
    # `expert_counts` still describes the latest call of any kind.
    assert not np.array_equal(_np(layer.expert_counts), served_before)


def test_average_load_is_a_mean_then_a_moving_average():
    layer = SparseMoE(4, 6, top_k=1)
    layer.statistics_momentum = 0.5  # plain mean for 2 calls, then rate 0.5
    loads, average = [], None
    for step in range(4):
        layer(_inputs(seed=step), training=True)
        loads.append(layer.routing_statistics()["expert_load"])
        rate = max(1.0 / (step + 1), 0.5)
        average = loads[0] if average is None else average + rate * (loads[-1] - average)
        np.testing.assert_allclose(layer.routing_statistics()["average_load"], average, atol=1e-6)
    np.testing.assert_allclose(_np(layer.accumulated_counts), 12 * np.sum(loads, axis=0), atol=1e-5)


def test_a_call_without_real_tokens_leaves_the_averages():
    layer = SparseMoE(4, 6)
    layer(_inputs(), training=True)
    average = layer.routing_statistics()["average_load"]
    layer(_inputs(), training=True, mask=np.zeros((2, 6), bool))
    stats = layer.routing_statistics()
    np.testing.assert_array_equal(stats["average_load"], average)
    assert stats["training_steps"] == 1
    np.testing.assert_array_equal(stats["expert_load"], np.zeros(4))
    assert stats["load_max_mean_ratio"] == 0.0


def test_sigmoid_scores_are_normalized_for_entropy():
    layer = SparseMoE(4, 6, score_func="sigmoid")
    _, routing = layer(_inputs(), training=True, return_routing=True)
    scores = 1 / (1 + np.exp(-_np(routing["router_logits"]).astype("float64")))
    probs = scores / scores.sum(-1, keepdims=True)
    stats = layer.routing_statistics()
    np.testing.assert_allclose(stats["router_entropy"], (-(probs * np.log(probs)).sum(-1)).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(stats["router_confidence"], probs.max(-1).mean(), rtol=1e-5)


def test_reset_routing_statistics():
    layer = SparseMoE(4, 6)
    layer(_inputs(), training=True)
    layer.reset_routing_statistics()
    for name in TRAINING_STATISTICS:
        assert not _np(getattr(layer, name)).any(), name


def test_files_written_before_the_statistics_still_load():
    """Own-variable files with 2 (first release) or 3 (nonfinite_count) entries load."""
    layer = SparseMoE(4, 6)
    layer.build((None, HIDDEN))
    old = {"0": np.arange(4, dtype="float32"), "1": np.float32(3.0), "2": np.float32(1.0)}
    for count in (2, 3):
        layer.reset_routing_statistics()
        layer.load_own_variables({key: old[key] for key in list(old)[:count]})
        np.testing.assert_array_equal(_np(layer.expert_counts), np.arange(4))
        assert float(_np(layer.nonfinite_count)) == (1.0 if count == 3 else 0.0)
    full = {str(i): _np(v) for i, v in enumerate(layer._non_trainable_variables)}
    full["3"] = np.ones(4, "float32")
    layer.load_own_variables(full)
    np.testing.assert_array_equal(_np(layer.assignment_counts), np.ones(4))
    with pytest.raises(ValueError, match="expected"):
        layer.load_own_variables({"0": old["0"]})
    with pytest.raises(ValueError, match="expected"):  # right count, wrong shapes
        layer.load_own_variables({str(i): np.zeros((7,), "float32") for i in range(3)})


def test_statistics_survive_save_and_load(tmp_path):
    model = keras.Sequential([keras.Input((6, HIDDEN)), SparseMoE(4, 6, name="moe")])
    model(_inputs(), training=True)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    a = keras_moe.routing_stats(model)["moe"]
    b = keras_moe.routing_stats(loaded)["moe"]
    np.testing.assert_array_equal(a["assignment_counts"], b["assignment_counts"])
    assert a["router_entropy"] == b["router_entropy"]
