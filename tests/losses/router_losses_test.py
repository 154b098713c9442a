"""Router losses against their formulas."""

import keras
import numpy as np

from keras_moe import losses


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_load_balancing_loss_formula():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 4)).astype("float32")
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    indices = np.argsort(-probs, -1)[..., :2].astype("int32")
    f = np.bincount(indices.ravel(), minlength=4) / indices.size
    P = probs.reshape(-1, 4).mean(0)
    np.testing.assert_allclose(float(_np(losses.load_balancing_loss(probs, indices))), 4 * (f * P).sum(), rtol=1e-5)


def test_load_balancing_loss_balanced_is_one_and_normalizes_sigmoid_scores():
    probs = np.full((4, 2), 0.5, "float32")
    indices = np.array([[0], [1], [0], [1]], "int32")
    assert abs(float(_np(losses.load_balancing_loss(probs, indices))) - 1.0) < 1e-6
    # Sigmoid scores are normalized over experts before averaging.
    assert abs(float(_np(losses.load_balancing_loss(probs * 0.3, indices))) - 1.0) < 1e-6


def test_load_balancing_loss_mask():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=6).astype("float32")
    indices = rng.integers(0, 4, (6, 2)).astype("int32")
    mask = np.array([True, True, False, True, False, True])
    masked = float(_np(losses.load_balancing_loss(probs, indices, mask=mask)))
    subset = float(_np(losses.load_balancing_loss(probs[mask], indices[mask])))
    np.testing.assert_allclose(masked, subset, rtol=1e-6)


def test_left_out_tokens_with_nan_scores_do_not_poison_the_losses():
    # A padding token or a token with non-finite logits may carry NaN
    # scores; the mask leaves it out of both losses (selected away, not
    # multiplied by 0, which would give NaN).
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(4), size=5).astype("float32")
    logits = rng.standard_normal((5, 4)).astype("float32")
    indices = rng.integers(0, 4, (5, 2)).astype("int32")
    mask = np.array([True, False, True, True, True])
    probs[1], logits[1] = np.nan, np.nan
    balance = float(_np(losses.load_balancing_loss(probs, indices, mask=mask)))
    expected = float(_np(losses.load_balancing_loss(probs[mask], indices[mask])))
    np.testing.assert_allclose(balance, expected, rtol=1e-6)
    z = float(_np(losses.router_z_loss(logits, mask=mask)))
    np.testing.assert_allclose(z, float(_np(losses.router_z_loss(logits[mask]))), rtol=1e-6)


def test_sparse_moe_aux_loss_stays_finite_with_a_nan_token():
    from keras_moe.layers import SparseMoE

    layer = SparseMoE(num_experts=4, intermediate_dim=8, top_k=2)
    x = np.random.default_rng(0).standard_normal((1, 6, 8)).astype("float32")
    x[0, 2] = np.nan
    outputs = _np(layer(x, training=True))
    assert np.isnan(outputs[0, 2]).all() and np.isfinite(np.delete(outputs[0], 2, 0)).all()
    assert all(np.isfinite(float(_np(v))) for v in layer.losses)


def test_router_z_loss_formula_and_mask():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3, 4, 5)).astype("float32")
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(_np(losses.router_z_loss(logits))), (lse**2).mean(), rtol=1e-5)
    mask = np.zeros((3, 4), bool)
    mask[0] = True
    np.testing.assert_allclose(
        float(_np(losses.router_z_loss(logits, mask=mask))), (lse[0] ** 2).mean(), rtol=1e-5
    )


def _cv2(x):
    x = np.asarray(x, "float64").ravel()
    return x.var() / (x.mean() ** 2 + 1e-10)


def test_cv_squared_formula():
    x = np.array([1.0, 2.0, 5.0, 0.0], "float32")
    np.testing.assert_allclose(float(_np(losses.cv_squared(x))), _cv2(x), rtol=1e-5)
    assert float(_np(losses.cv_squared(np.ones(3, "float32")))) == 0.0


def test_importance_loss_formula_and_mask_with_nan_padding():
    rng = np.random.default_rng(3)
    gates = rng.random((2, 5, 4)).astype("float32")
    np.testing.assert_allclose(
        float(_np(losses.importance_loss(gates))), _cv2(gates.reshape(-1, 4).sum(0)), rtol=1e-5
    )
    mask = np.ones((2, 5), bool)
    mask[1, 3:] = False
    gates[1, 3:] = np.nan  # a padding token's values never reach the loss
    np.testing.assert_allclose(
        float(_np(losses.importance_loss(gates, mask=mask))), _cv2(gates[mask].sum(0)), rtol=1e-5
    )


def _normal_cdf(x):
    from math import erf, sqrt

    return np.vectorize(lambda v: 0.5 * (1 + erf(v / sqrt(2))))(x)


def _prob_in_top_k(clean, noisy, stddev, k):
    """tensor2tensor's `_prob_in_top_k`, row by row."""
    top = -np.sort(-noisy, axis=-1)
    threshold_in, threshold_out = top[..., k : k + 1], top[..., k - 1 : k]
    is_in = noisy > threshold_in
    return np.where(
        is_in, _normal_cdf((clean - threshold_in) / stddev), _normal_cdf((clean - threshold_out) / stddev)
    )


def test_prob_in_top_k_and_load_loss_formulas():
    rng = np.random.default_rng(4)
    clean = rng.standard_normal((3, 7, 5)).astype("float32")
    stddev = (0.1 + rng.random((3, 7, 5))).astype("float32")
    noisy = (clean + rng.standard_normal((3, 7, 5)) * stddev).astype("float32")
    expected = _prob_in_top_k(clean, noisy, stddev, 2)
    np.testing.assert_allclose(_np(losses.prob_in_top_k(clean, noisy, stddev, 2)), expected, atol=1e-5)
    np.testing.assert_allclose(
        float(_np(losses.load_loss(clean, noisy, stddev, 2))),
        _cv2(expected.reshape(-1, 5).sum(0)),
        rtol=1e-4,
    )
    mask = rng.random((3, 7)) > 0.3
    np.testing.assert_allclose(
        float(_np(losses.load_loss(clean, noisy, stddev, 2, mask=mask))),
        _cv2(expected[mask].sum(0)),
        rtol=1e-4,
    )
    # Every expert always chosen: nothing to balance.
    assert float(_np(losses.load_loss(clean, noisy, stddev, 5))) == 0.0
