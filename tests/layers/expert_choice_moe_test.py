"""ExpertChoiceMoE: each expert takes its top-C tokens of a routing group."""

import math
import warnings

import keras
import numpy as np
import pytest

from keras_moe.layers import ExpertChoiceMoE
from keras_moe.routers import ExpertChoiceRouter
from tests.layers.sparse_moe_test import reference_outputs

HIDDEN = 6


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _inputs(shape=(2, 8, HIDDEN), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _expected_choice(probs, routed, capacity):
    """`(S, E)` bool: each expert's top-`capacity` routed tokens, in NumPy."""
    chosen = np.zeros(probs.shape, bool)
    for e in range(probs.shape[1]):
        keys = np.where(routed, probs[:, e], -1.0)
        top = np.argsort(-keys, kind="stable")[:capacity]
        chosen[top, e] = routed[top]
    return chosen


def _dense(routing, key, num_experts):
    """A routing entry `(..., E)` in expert order (the plan lists best first)."""
    idx = _np(routing["expert_indices"])
    out = np.zeros(idx.shape, _np(routing[key]).dtype)
    np.put_along_axis(out, idx, _np(routing[key]), -1)
    return out.reshape(-1, num_experts)


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("kwargs", [dict(), dict(gated=True, use_bias=True, router_bias=True)])
def test_experts_choose_their_top_tokens(group_size, kwargs):
    layer = ExpertChoiceMoE(4, 12, capacity_factor=1.5, group_size=group_size, **kwargs)
    x = _inputs()
    y, r = layer(x, return_routing=True)
    probs = _softmax(_np(r["router_logits"]).reshape(-1, 4))
    weights, dispatched = _dense(r, "expert_weights", 4), _dense(r, "dispatched", 4)
    size = group_size or 16
    capacity = math.ceil(size * 1.5 / 4)
    for start in range(0, 16, size):
        group = slice(start, start + size)
        expected = _expected_choice(probs[group], np.ones(size, bool), capacity)
        np.testing.assert_array_equal(dispatched[group], expected)
    np.testing.assert_allclose(weights, probs, rtol=1e-5)
    np.testing.assert_allclose(_np(layer.expert_counts), [16 // size * capacity] * 4)
    assert float(_np(layer.dropped_count)) == 0.0
    np.testing.assert_allclose(_np(y).reshape(-1, HIDDEN), reference_outputs(layer, x, r), atol=1e-5)


def test_masked_tokens_are_never_chosen_and_change_nothing():
    layer = ExpertChoiceMoE(3, 8, capacity_factor=2.0)
    x = _inputs()
    mask = np.ones((2, 8), bool)
    mask[:, 5:] = False
    y, r = layer(x, mask=mask, return_routing=True)
    disp = _np(r["dispatched"])
    assert not disp[~mask].any() and np.all(_np(y)[~mask] == 0)
    # 10 real tokens, capacity ceil(16 * 2 / 3) = 11: every expert takes all of them.
    assert disp[mask].all()
    x_other = x.copy()
    x_other[~mask] = 50.0
    y_other = layer(x_other, mask=mask)
    np.testing.assert_allclose(_np(y_other), _np(y), atol=1e-6)


def test_eval_capacity_factor_and_non_finite_tokens():
    layer = ExpertChoiceMoE(4, 8, capacity_factor=1.0, eval_capacity_factor=2.0)
    x = _inputs((1, 8, HIDDEN))
    _, r_train = layer(x, training=True, return_routing=True)
    _, r_eval = layer(x, return_routing=True)
    assert _np(r_train["dispatched"]).sum() == 4 * 2 and _np(r_eval["dispatched"]).sum() == 4 * 4
    x[0, 3] = np.nan
    y, r = layer(x, return_routing=True)
    assert np.isnan(_np(y)[0, 3]).all() and not _np(r["dispatched"])[0, 3].any()
    assert np.isfinite(_np(y)[0, [0, 1, 2, 4, 5, 6, 7]]).all()
    assert float(_np(layer.nonfinite_count)) == 1.0


def test_warns_once_that_it_is_not_causal():
    ExpertChoiceRouter._warned_not_causal = False
    with pytest.warns(UserWarning, match="not causal"):
        ExpertChoiceMoE(2, 4)(_inputs())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ExpertChoiceMoE(2, 4)(_inputs())


def test_fit_config_and_save_round_trip(tmp_path):
    layer = ExpertChoiceMoE(4, 8, capacity_factor=1.25, group_size=8, shared_intermediate_dim=4,
                            router_z_loss_weight=1e-3, name="ec")
    model = keras.Sequential([keras.Input((8, HIDDEN)), layer, keras.layers.Dense(1)])
    model.compile("adam", "mse")
    x = _inputs((6, 8, HIDDEN))
    history = model.fit(x, np.ones((6, 8, 1), "float32"), epochs=2, batch_size=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    model.summary(print_fn=lambda *a, **k: None)
    config = layer.get_config()
    assert ExpertChoiceMoE.from_config(config).get_config() == config
    path = str(tmp_path / "ec.keras")
    model.save(path)
    np.testing.assert_allclose(_np(keras.models.load_model(path)(x)), _np(model(x)), atol=1e-6)


def test_router_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = ExpertChoiceMoE(4, 8)
    y, r = layer(_inputs(), return_routing=True)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(r["router_logits"].dtype) == "float32"


def test_invalid_arguments():
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceMoE(4, 8, capacity_factor=0.0)
    with pytest.raises(ValueError, match="eval_capacity_factor"):
        ExpertChoiceMoE(4, 8, eval_capacity_factor=-1.0)
    with pytest.raises(ValueError, match="group_size"):
        ExpertChoiceMoE(4, 8, group_size=0)
    with pytest.raises(ValueError, match="router_jitter"):
        ExpertChoiceMoE(4, 8, router_jitter=1.5)


def test_empty_batches_and_unknown_batch_sizes():
    layer = ExpertChoiceMoE(4, 8, capacity_factor=1.0)
    layer(_inputs())
    y, r = layer(np.zeros((0, 8, HIDDEN), "float32"), return_routing=True)
    assert tuple(y.shape) == (0, 8, HIDDEN) and tuple(r["dispatched"].shape) == (0, 8, 4)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # A graph traced for any batch size: the capacity is a tensor.
        call = tf.function(lambda x: layer(x), input_signature=[tf.TensorSpec((None, 8, HIDDEN))])
        x = _inputs((3, 8, HIDDEN))
        np.testing.assert_allclose(_np(call(x)), _np(layer(x)), atol=1e-6)
        assert float(_np(layer.expert_counts).sum()) == 4 * 6
