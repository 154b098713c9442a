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
