"""SoftMoE against the formulas of vmoe's SoftRouter."""

import keras
import numpy as np
import pytest

from keras_moe.layers import SoftMoE

HIDDEN = 6


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _inputs(shape=(2, 7, HIDDEN), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _normalize(x, axis=-1):
    return x / np.sqrt((x**2).sum(axis, keepdims=True) + 1e-6)


def _softmax(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _reference(layer, x):
    """Soft MoE written out (vmoe: normalized inputs and mu, learned scale)."""
    mu = _normalize(_np(layer.mu), axis=0) * float(_np(layer.scale))
    E, p = layer.num_experts, layer.slots_per_expert
    logits = np.einsum("bmd,dnp->bmnp", _normalize(x), mu).reshape(len(x), -1, E * p)
    dispatch, combine = _softmax(logits, 1), _softmax(logits, -1)
    slots = np.einsum("bms,bmd->bsd", dispatch, x).reshape(len(x), E, p, -1)
    e = layer.experts
    up, down = _np(e.up_kernel), _np(e.down_kernel)
    h = np.einsum("bepd,edh->beph", slots, up)
    h = _np(keras.activations.gelu(h))
    y = np.einsum("beph,ehd->bepd", h, down).reshape(len(x), E * p, -1)
    return np.einsum("bms,bsd->bmd", combine, y)


def test_outputs_match_the_formula():
    layer = SoftMoE(3, 2, 8)
    x = _inputs()
    layer.build(x.shape)
    layer.scale.assign(2.5)
    np.testing.assert_allclose(_np(layer(x)), _reference(layer, x), atol=2e-5)


def test_routing_weights_sum_to_one_and_masked_tokens_do_nothing():
    layer = SoftMoE(4, 2, 8)
    x = _inputs()
    mask = np.ones((2, 7), bool)
    mask[0, 4:] = False
    y, r = layer(x, mask=mask, return_routing=True)
    dispatch, combine = _np(r["dispatch_weights"]), _np(r["combine_weights"])
    assert dispatch.shape == (2, 7, 4, 2)
    np.testing.assert_allclose(dispatch.sum(1), 1.0, rtol=1e-5)  # each slot, over real tokens
    assert np.all(dispatch[~mask] == 0)
    np.testing.assert_allclose(combine[mask].sum((-1, -2)), 1.0, rtol=1e-5)
    assert np.all(_np(y)[~mask] == 0)
    x_other = x.copy()
    x_other[~mask] = 1e3
    np.testing.assert_allclose(_np(layer(x_other, mask=mask)), _np(y), atol=1e-6)
    # The soft load: combine mass per expert over real tokens.
    np.testing.assert_allclose(_np(layer.expert_counts), combine[mask].sum((0, 2)), rtol=1e-5)
    np.testing.assert_allclose(_np(layer.expert_counts).sum(), mask.sum(), rtol=1e-5)


def test_logits_ignore_the_token_norm():
    layer = SoftMoE(2, 3, 8)
    x = _inputs()
    _, r = layer(x, return_routing=True)
    _, r_scaled = layer(7.0 * x, return_routing=True)
    np.testing.assert_allclose(_np(r_scaled["router_logits"]), _np(r["router_logits"]), atol=1e-5)


def test_shapes_non_finite_tokens_and_empty_examples():
    layer = SoftMoE(2, 2, 8)
    assert tuple(layer(_inputs((3, HIDDEN))).shape) == (3, HIDDEN)
    assert tuple(layer(_inputs((2, 3, 2, HIDDEN))).shape) == (2, 3, 2, HIDDEN)
    x = _inputs()
    x[1, 2] = np.inf
    y = _np(layer(x))
    assert np.isnan(y[1, 2]).all() and np.isfinite(np.delete(y[1], 2, 0)).all()
    assert float(_np(layer.nonfinite_count)) == 1.0
    mask = np.ones((2, 7), bool)
    mask[0] = False  # an example with no real token
    y = _np(layer(_inputs(), mask=mask))
    assert np.all(y[0] == 0) and np.isfinite(y).all()
    for empty in ((0, 7, HIDDEN), (2, 0, HIDDEN)):
        y, r = layer(np.zeros(empty, "float32"), return_routing=True)
        assert tuple(y.shape) == empty
        assert tuple(r["combine_weights"].shape) == empty[:-1] + (2, 2)


def test_fit_config_save_and_mixed_precision(tmp_path):
    layer = SoftMoE(4, 2, 8, gated=True, activation="silu", name="soft")
    model = keras.Sequential([keras.Input((7, HIDDEN)), layer, keras.layers.Dense(1)])
    model.compile("adam", "mse")
    x = _inputs((6, 7, HIDDEN))
    history = model.fit(x, np.ones((6, 7, 1), "float32"), epochs=2, batch_size=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    model.summary(print_fn=lambda *a, **k: None)
    config = layer.get_config()
    assert SoftMoE.from_config(config).get_config() == config
    path = str(tmp_path / "soft.keras")
    model.save(path)
    np.testing.assert_allclose(_np(keras.models.load_model(path)(x)), _np(model(x)), atol=1e-6)
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = SoftMoE(4, 2, 8)
    y, r = layer(x, return_routing=True)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(layer.mu.dtype) == "float32"
    np.testing.assert_allclose(_np(r["dispatch_weights"]).sum(1), 1.0, rtol=1e-5)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="slots_per_expert"):
        SoftMoE(4, 0, 8)
    with pytest.raises(ValueError, match="num_experts"):
        SoftMoE(0, 2, 8)
    with pytest.raises(ValueError, match="expert_dropout"):
        SoftMoE(2, 2, 8, expert_dropout=1.0)
    with pytest.raises(ValueError, match="mask"):
        SoftMoE(2, 2, 8)(_inputs(), mask=np.ones((2, 6), bool))


def test_unknown_batch_size_in_a_tensorflow_graph():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("graphs with an unknown batch size are a TensorFlow matter")
    import tensorflow as tf

    layer = SoftMoE(2, 3, 8)
    x = _inputs()
    call = tf.function(lambda t: layer(t), input_signature=[tf.TensorSpec((None, 7, HIDDEN))])
    np.testing.assert_allclose(_np(call(x)), _np(layer(x)), atol=1e-6)
