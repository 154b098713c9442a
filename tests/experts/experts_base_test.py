"""Custom experts through the expert protocol, in every dispatch mode."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_moe
from keras_moe.experts import Experts
from keras_moe.layers import MoE
from keras_moe.routers import ExpertChoiceRouter
from keras_moe.routers import TopKRouter

HIDDEN = 6


def _np(x):
    return ops.convert_to_numpy(x)


@keras.saving.register_keras_serializable(package="keras_moe_tests")
class DeepExperts(Experts):
    """Experts of another shape: two hidden layers of different widths, a per-expert gain."""

    def __init__(self, num_experts, widths=(8, 5), **kwargs):
        super().__init__(num_experts, **kwargs)
        self.widths = tuple(widths)

    def build(self, input_shape):
        d, (w1, w2), E = input_shape[-1], self.widths, self.num_experts
        init = keras_moe.experts.StackedInitializer("glorot_uniform")
        self.k1 = self.add_weight(name="k1", shape=(E, d, w1), initializer=init)
        self.b1 = self.add_weight(name="b1", shape=(E, w1), initializer="random_normal")
        self.k2 = self.add_weight(name="k2", shape=(E, w1, w2), initializer=init)
        self.k3 = self.add_weight(name="k3", shape=(E, w2, d), initializer=init)
        self.gain = self.add_weight(name="gain", shape=(E,), initializer="random_normal")

    def expert_call(self, x, layout, training=None):
        h = ops.relu(layout.linear(x, self.k1, self.b1))
        h = ops.tanh(layout.linear(h, self.k2))
        return layout.linear(h, self.k3) * layout.param(self.gain)

    def get_config(self):
        return {**super().get_config(), "widths": self.widths}


class BufferOnlyExperts(keras.layers.Layer):
    """The minimal protocol: `num_experts` and `call` on capacity buffers."""

    def __init__(self, num_experts, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(self.num_experts, input_shape[-1], input_shape[-1]))

    def call(self, buffer, training=None):
        return keras_moe.experts.contractions.stacked_matmul(buffer, self.kernel)


def _deep_reference(experts, x, e):
    k1, b1, k2, k3, gain = (_np(v) for v in (experts.k1, experts.b1, experts.k2, experts.k3,
                                             experts.gain))
    h = np.maximum(x @ k1[e] + b1[e], 0)
    return np.tanh(h @ k2[e]) @ k3[e] * gain[e]


def _reference(layer, x, routing):
    x = x.reshape(-1, HIDDEN)
    idx = _np(routing["expert_indices"]).reshape(len(x), -1)
    w = _np(routing["expert_weights"]).reshape(len(x), -1)
    disp = _np(routing["dispatched"]).reshape(len(x), -1)
    out = np.zeros_like(x)
    for t in range(len(x)):
        for j in range(idx.shape[1]):
            if disp[t, j]:
                out[t] += w[t, j] * _deep_reference(layer.experts, x[t], idx[t, j])
    return out


def _inputs(shape=(2, 7, HIDDEN)):
    return np.random.default_rng(0).standard_normal(shape).astype("float32")


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_custom_experts_in_capacity_and_dropless_modes(capacity_factor):
    layer = MoE(TopKRouter(4, top_k=2), DeepExperts(4), capacity_factor=capacity_factor)
    x = _inputs()
    y, routing = layer(x, return_routing=True)
    if capacity_factor is None:
        assert _np(routing["dispatched"]).all()
    np.testing.assert_allclose(_np(y).reshape(-1, HIDDEN), _reference(layer, x, routing), atol=1e-5)


@pytest.mark.parametrize("strategy", keras_moe.dispatch.STRATEGIES)
def test_every_dropless_strategy_runs_the_custom_formula(strategy):
    if strategy == "grouped" and not keras_moe.backend.has_grouped_matmul():
        pytest.skip("no grouped matmul on this backend")
    experts = DeepExperts(3)
    x = _inputs((9, HIDDEN)).reshape(9, HIDDEN)
    experts.build(x.shape)
    idx = np.random.default_rng(1).integers(0, 3, (9, 2)).astype("int32")
    idx[:, 1] = (idx[:, 0] + 1) % 3
    w = np.random.default_rng(2).random((9, 2)).astype("float32")
    valid = np.ones((9, 2), bool)
    valid[4] = False
    y = keras_moe.dispatch.dispatch_dropless(x, idx, w, valid, experts, strategy=strategy)
    expected = np.stack([
        sum(w[t, j] * _deep_reference(experts, x[t], idx[t, j]) for j in range(2) if valid[t, j])
        if valid[t].any() else np.zeros(HIDDEN) for t in range(9)
    ])
    np.testing.assert_allclose(_np(y), expected, atol=1e-5)


def test_custom_experts_fit_save_and_load(tmp_path):
    model = keras.Sequential([
        keras.Input((5, HIDDEN)),
        MoE(TopKRouter(3, top_k=2), DeepExperts(3, widths=(4, 3)), name="moe"),
    ])
    model.compile("adam", "mse")
    x = _inputs((8, 5, HIDDEN))
    model.fit(x, x, epochs=1, batch_size=4, verbose=0)
    path = str(tmp_path / "custom.keras")
    model.save(path)
    np.testing.assert_allclose(_np(keras.models.load_model(path)(x)), _np(model(x)), atol=1e-6)


def test_buffer_only_experts_need_a_capacity_factor():
    x = _inputs()
    layer = MoE(TopKRouter(4), BufferOnlyExperts(4), capacity_factor=1.0)
    assert tuple(layer(x).shape) == x.shape
    layer = MoE(ExpertChoiceRouter(4, capacity_factor=1.0), BufferOnlyExperts(4))
    assert tuple(layer(x).shape) == x.shape
    with pytest.raises(ValueError, match="capacity_factor.*BufferOnlyExperts.*Experts"):
        MoE(TopKRouter(4), BufferOnlyExperts(4))
