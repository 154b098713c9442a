"""SwitchFFN is SparseMoE configured as the Switch Transformer layer."""

import keras
import numpy as np
import pytest

from keras_moe.layers import SparseMoE
from keras_moe.layers import SwitchFFN


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_defaults_are_switch():
    layer = SwitchFFN(num_experts=4, intermediate_dim=16)
    config = layer.get_config()
    assert config["top_k"] == 1 and config["normalize_top_k"] is False
    assert config["capacity_factor"] == 1.25 and config["eval_capacity_factor"] == 2.0
    assert config["router_jitter"] == 0.01 and config["router_z_loss_weight"] == 1e-3
    assert config["load_balance_loss_weight"] == 1e-2 and config["activation"] == "relu"
    assert isinstance(layer, SparseMoE)


def test_weight_is_chosen_probability_and_capacity():
    layer = SwitchFFN(num_experts=4, intermediate_dim=16, group_size=8)
    x = np.random.default_rng(0).standard_normal((2, 8, 8)).astype("float32")
    y, r = layer(x, return_routing=True)  # inference: capacity 2.0
    probs = _np(keras.ops.softmax(r["router_logits"], -1))
    np.testing.assert_allclose(_np(r["expert_weights"])[..., 0], probs.max(-1), rtol=1e-6)
    _, r = layer(x, training=True, return_routing=True)
    idx, disp = _np(r["expert_indices"]), _np(r["dispatched"])
    capacity = int(np.ceil(1.25 * 8 * 1 / 4))
    for group in range(2):
        for e in range(4):
            assert ((idx[group] == e) & disp[group]).sum() <= capacity
    assert len(layer.losses) == 2


def test_expert_dropout_in_training_only():
    layer = SwitchFFN(4, 32, expert_dropout=0.5, router_jitter=0.0, capacity_factor=None, seed=1)
    x = np.random.default_rng(0).standard_normal((1, 8, 8)).astype("float32")
    np.testing.assert_allclose(_np(layer(x)), _np(layer(x)))
    assert not np.allclose(_np(layer(x, training=True)), _np(layer(x)))


def test_round_trip_and_other_arguments():
    layer = SwitchFFN(4, 16, use_bias=True, group_size=16, name="switch")
    clone = SwitchFFN.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    with pytest.raises(ValueError, match="capacity_factor"):
        SwitchFFN(4, 16, capacity_factor=0)
