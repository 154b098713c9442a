import numpy as np
import pytest
import keras
from keras import ops

from keras_moe.layers import MMoE


def _x(batch=4, features=6):
    return np.random.default_rng(0).normal(size=(batch, features)).astype(
        "float32"
    )


def _np(x):
    return ops.convert_to_numpy(x)


def _weights(layer):
    return {w.path.split("/", 1)[1]: _np(w) for w in layer.weights}


@pytest.mark.parametrize(
    "expert_units, gate_units", [(5, ()), ([7, 5], ()), ([5], [3, 4])]
)
def test_output_and_gate_shapes(expert_units, gate_units):
    layer = MMoE(3, 4, expert_units, gate_units=gate_units)
    outputs, gates = layer(_x(), return_gates=True)
    assert isinstance(outputs, list) and isinstance(gates, list)
    assert [tuple(o.shape) for o in outputs] == [(4, 5)] * 3
    assert [tuple(g.shape) for g in gates] == [(4, 4)] * 3
    plain = layer(_x())
    assert isinstance(plain, list) and len(plain) == 3
    for a, b in zip(plain, outputs):
        np.testing.assert_allclose(_np(a), _np(b))


def test_gate_rows_are_distributions():
    layer = MMoE(2, 5, 3, gate_units=[4], gate_initializer="glorot_uniform")
    _, gates = layer(_x(8) * 10.0, return_gates=True)
    for gate in gates:
        gate = _np(gate)
        assert gate.dtype == np.float32
        assert (gate >= 0).all()
        np.testing.assert_allclose(gate.sum(axis=-1), 1.0, atol=1e-6)


def test_outputs_are_gate_mixtures_of_the_experts():
    x = _x()
    layer = MMoE(2, 3, [5, 4], gate_initializer="random_normal")
    outputs, gates = layer(x, return_gates=True)
    w = _weights(layer)
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    experts = relu(np.einsum("bi,eio->beo", x, w["experts/kernel_0"])
                   + w["experts/bias_0"])
    experts = relu(np.einsum("bei,eio->beo", experts, w["experts/kernel_1"])
                   + w["experts/bias_1"])
    logits = np.einsum("bi,tio->bto", x, w["gates/kernel_0"]) + w[
        "gates/bias_0"
    ]
    expected_gates = np.exp(logits - logits.max(-1, keepdims=True))
    expected_gates /= expected_gates.sum(-1, keepdims=True)
    for t in range(2):
        np.testing.assert_allclose(
            _np(gates[t]), expected_gates[:, t], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            _np(outputs[t]),
            np.einsum("be,beo->bo", expected_gates[:, t], experts),
            rtol=1e-5,
            atol=1e-5,
        )


def test_expert_kernels_are_stacked():
    layer = MMoE(2, 3, [5, 4], gate_units=[6])
    layer.build((None, 7))
    shapes = {name: v.shape for name, v in _weights(layer).items()}
    assert shapes == {
        "experts/kernel_0": (3, 7, 5),
        "experts/bias_0": (3, 5),
        "experts/kernel_1": (3, 5, 4),
        "experts/bias_1": (3, 4),
        "gates/kernel_0": (2, 7, 6),
        "gates/bias_0": (2, 6),
        "gates/kernel_1": (2, 6, 3),
        "gates/bias_1": (2, 3),
    }


def test_mixed_precision():
    layer = MMoE(2, 3, 4, dtype="mixed_bfloat16")
    outputs, gates = layer(_x(), return_gates=True)
    assert keras.backend.standardize_dtype(outputs[0].dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(gates[0].dtype) == "float32"
    assert keras.backend.standardize_dtype(layer.weights[0].dtype) == "float32"


def test_single_task():
    layer = MMoE(1, 3, 4)
    outputs, gates = layer(_x(), return_gates=True)
    assert len(outputs) == 1 and tuple(outputs[0].shape) == (4, 4)
    assert len(gates) == 1 and tuple(gates[0].shape) == (4, 3)


def test_higher_rank_inputs():
    x = np.random.default_rng(1).normal(size=(2, 3, 6)).astype("float32")
    outputs, gates = MMoE(2, 3, 4)(x, return_gates=True)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 4)] * 2
    assert [tuple(g.shape) for g in gates] == [(2, 3, 3)] * 2


@pytest.mark.parametrize(
    "initializer",
    ["glorot_uniform", keras.initializers.GlorotUniform(seed=7)],
)
def test_experts_start_independent_with_their_own_fans(initializer):
    fan_in, fan_out, num_experts = 64, 32, 6
    layer = MMoE(2, num_experts, fan_out, kernel_initializer=initializer)
    layer.build((None, fan_in))
    kernel = _weights(layer)["experts/kernel_0"]
    for i in range(num_experts):
        for j in range(i + 1, num_experts):
            assert not np.allclose(kernel[i], kernel[j])
            corr = np.corrcoef(kernel[i].ravel(), kernel[j].ravel())[0, 1]
            assert abs(corr) < 0.15
    # Glorot uniform on the (fan_in, fan_out) slice, not on the 3-D shape.
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    assert np.abs(kernel).max() <= limit + 1e-6
    np.testing.assert_allclose(
        kernel.std(axis=(1, 2)), limit / np.sqrt(3.0), rtol=0.1
    )


def test_gates_start_uniform_by_default():
    layer = MMoE(2, 4, 3, gate_units=[5])
    _, gates = layer(_x(), return_gates=True)
    for gate in gates:
        np.testing.assert_allclose(_np(gate), 0.25, atol=1e-6)
    # The hidden gate layer is random, and so is a non-default last layer.
    kernels = _weights(layer)
    assert not np.allclose(kernels["gates/kernel_0"][0], kernels["gates/kernel_0"][1])
    layer = MMoE(2, 4, 3, gate_initializer="glorot_uniform")
    layer.build((None, 6))
    kernel = _weights(layer)["gates/kernel_0"]
    assert not np.allclose(kernel[0], kernel[1])


def test_seeded_initializer_is_reproducible():
    init = keras.initializers.GlorotUniform(seed=3)
    a = MMoE(2, 3, 4, kernel_initializer=init, name="a")
    b = MMoE(2, 3, 4, kernel_initializer=init, name="b")
    a.build((None, 5))
    b.build((None, 5))
    np.testing.assert_array_equal(
        _weights(a)["experts/kernel_0"], _weights(b)["experts/kernel_0"]
    )


def test_dropout_only_in_training():
    layer = MMoE(2, 3, 8, dropout=0.5)
    x = _x()
    inference = [_np(o) for o in layer(x, training=False)]
    again = [_np(o) for o in layer(x)]
    training = [_np(o) for o in layer(x, training=True)]
    for a, b, c in zip(inference, again, training):
        np.testing.assert_allclose(a, b)
        assert not np.allclose(a, c)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(num_tasks=0), "num_tasks"),
        (dict(num_tasks=2.0), "num_tasks"),
        (dict(num_experts=0), "num_experts"),
        (dict(expert_units=[]), "expert_units"),
        (dict(expert_units=[4, -1]), "expert_units"),
        (dict(expert_units=0), "expert_units"),
        (dict(gate_units=[0]), "gate_units"),
        (dict(dropout=1.0), "dropout"),
        (dict(use_bias="no"), "use_bias"),
        (dict(expert_units=[[4], [4]]), "expert_units"),
    ],
)
def test_invalid_arguments(kwargs, argument):
    args = dict(num_tasks=2, num_experts=3, expert_units=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        MMoE(**args)


def test_get_config_round_trip():
    layer = MMoE(
        2,
        3,
        [5, 4],
        gate_units=[3],
        expert_activation="gelu",
        gate_activation="tanh",
        gate_initializer="he_normal",
        use_bias=False,
        dropout=0.1,
        kernel_regularizer="l2",
    )
    config = layer.get_config()
    restored = MMoE.from_config(config)
    assert restored.get_config() == config
    x = _x()
    layer.build(x.shape)
    restored.build(x.shape)
    restored.set_weights(layer.get_weights())
    for a, b in zip(layer(x), restored(x)):
        np.testing.assert_allclose(_np(a), _np(b), atol=1e-6)


def test_functional_model_save_and_load(tmp_path):
    inputs = keras.Input(shape=(6,))
    outputs, gates = MMoE(2, 3, [5, 4], gate_units=[3])(
        inputs, return_gates=True
    )
    assert [tuple(o.shape) for o in outputs] == [(None, 4)] * 2
    assert [tuple(g.shape) for g in gates] == [(None, 3)] * 2
    model = keras.Model(inputs, outputs + gates)
    x = _x()
    expected = model.predict(x, verbose=0)
    path = tmp_path / "mmoe.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    for a, b in zip(expected, restored.predict(x, verbose=0)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_compute_output_shape():
    layer = MMoE(3, 2, [8, 5])
    assert layer.compute_output_shape((None, 7)) == [(None, 5)] * 3

