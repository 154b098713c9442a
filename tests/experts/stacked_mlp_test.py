import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.experts import StackedMLP


def _np(x):
    return ops.convert_to_numpy(x)


def _weights(layer):
    return {w.path.split("/")[-1]: _np(w) for w in layer.weights}


def _reference(x, weights, units, stacked_inputs, activate_output=True):
    """Each stack's MLP in NumPy, one after the other."""
    outputs = []
    for s in range(weights["kernel_0"].shape[0]):
        hidden = x[..., s, :] if stacked_inputs else x
        for i in range(len(units)):
            hidden = hidden @ weights[f"kernel_{i}"][s] + weights[f"bias_{i}"][s]
            if i < len(units) - 1 or activate_output:
                hidden = np.maximum(hidden, 0.0)
        outputs.append(hidden)
    return np.stack(outputs, axis=-2)


@pytest.mark.parametrize("num_stacks", [1, 3])
@pytest.mark.parametrize("stacked_inputs", [False, True])
def test_matches_one_mlp_per_stack(num_stacks, stacked_inputs):
    rng = np.random.default_rng(0)
    shape = (4, num_stacks, 5) if stacked_inputs else (4, 5)
    x = rng.standard_normal(shape).astype("float32")
    layer = StackedMLP(
        num_stacks,
        [6, 3],
        stacked_inputs=stacked_inputs,
        activate_output=False,
        bias_initializer="random_normal",
    )
    y = _np(layer(x))
    assert y.shape == (4, num_stacks, 3)
    expected = _reference(x, _weights(layer), [6, 3], stacked_inputs, activate_output=False)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_variables_in_saved_order_and_shapes():
    layer = StackedMLP(2, [6, 3], output_kernel_initializer="zeros")
    layer.build((None, 5))
    assert [(w.path.split("/")[-1], tuple(w.shape)) for w in layer.weights] == [
        ("kernel_0", (2, 5, 6)),
        ("bias_0", (2, 6)),
        ("kernel_1", (2, 6, 3)),
        ("bias_1", (2, 3)),
    ]
    weights = _weights(layer)
    np.testing.assert_array_equal(weights["kernel_1"], 0.0)
    assert not np.allclose(weights["kernel_0"][0], weights["kernel_0"][1])


def test_no_bias_and_higher_rank_inputs():
    layer = StackedMLP(2, 4, use_bias=False)
    y = layer(np.ones((2, 3, 5), "float32"))
    assert tuple(y.shape) == (2, 3, 2, 4)
    assert [w.path.split("/")[-1] for w in layer.weights] == ["kernel_0"]
    assert layer.compute_output_shape((2, 3, 5)) == (2, 3, 2, 4)


def test_dropout_only_in_training():
    layer = StackedMLP(2, 16, dropout=0.5)
    x = np.ones((4, 5), "float32")
    np.testing.assert_allclose(_np(layer(x)), _np(layer(x, training=False)))
    assert not np.allclose(_np(layer(x)), _np(layer(x, training=True)))


def test_config_round_trip_and_mixed_precision():
    layer = StackedMLP(
        3,
        [4, 2],
        activation="gelu",
        activate_output=False,
        stacked_inputs=True,
        dropout=0.1,
        output_kernel_initializer="zeros",
        kernel_regularizer="l2",
        dtype="mixed_bfloat16",
    )
    config = layer.get_config()
    restored = StackedMLP.from_config(config)
    assert restored.get_config() == config
    y = layer(np.ones((2, 3, 5), "float32"))
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(layer.weights[0].dtype) == "float32"


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(num_stacks=0), "num_stacks"),
        (dict(units=[]), "units"),
        (dict(units=[4, 0]), "units"),
        (dict(activate_output="yes"), "activate_output"),
        (dict(stacked_inputs=1), "stacked_inputs"),
        (dict(use_bias=None), "use_bias"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_invalid_arguments(kwargs, argument):
    args = dict(num_stacks=2, units=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        StackedMLP(**args)


def test_stacked_inputs_must_have_one_slice_per_stack():
    with pytest.raises(ValueError, match="3 slices on axis -2"):
        StackedMLP(3, 4, stacked_inputs=True)(np.ones((2, 2, 5), "float32"))
