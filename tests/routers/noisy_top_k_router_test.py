"""Noisy top-k gating (Shazeer et al., 2017) against its formulas."""

import keras
import numpy as np
import pytest

from keras_moe.layers import SparseMoE
from keras_moe.routers import NoisyTopKRouter
from keras_moe.routers import TopKRouter
from tests.losses.router_losses_test import _cv2
from tests.losses.router_losses_test import _prob_in_top_k

HIDDEN = 6


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _inputs(shape=(2, 9, HIDDEN), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _softplus(x):
    return np.log1p(np.exp(x))


def _router(**kwargs):
    router = NoisyTopKRouter(5, top_k=2, **kwargs)
    router.build((None, None, HIDDEN))
    rng = np.random.default_rng(7)
    router.noise_kernel.assign(rng.standard_normal((HIDDEN, 5)).astype("float32"))
    return router


def test_inference_is_plain_top_k_softmax():
    router = _router()
    plain = TopKRouter(5, top_k=2)
    plain.build((None, None, HIDDEN))
    plain.kernel.assign(router.kernel)
    x = _inputs()
    noisy_plan, plan = router(x), plain(x)
    for key in ("expert_indices", "expert_weights", "router_logits", "dispatch_mask"):
        np.testing.assert_allclose(_np(noisy_plan[key]), _np(plan[key]), atol=1e-6)


def test_training_noise_weights_and_losses_follow_the_formulas():
    router = _router()
    x = _inputs()
    plan = router(x, training=True)
    clean = x @ _np(router.kernel)
    stddev = _softplus(x @ _np(router.noise_kernel)) + 1e-2
    noisy = _np(plan.router_logits)
    assert np.abs(noisy - clean).max() > 1e-3  # noise was added...
    z = (noisy - clean) / stddev
    assert 0.5 < z.std() < 1.5  # ...with the learned scale
    idx = _np(plan.expert_indices)
    np.testing.assert_array_equal(idx, np.argsort(-noisy, -1)[..., :2])
    kept = np.take_along_axis(noisy, idx, -1)
    softmax_kept = np.exp(kept) / np.exp(kept).sum(-1, keepdims=True)
    np.testing.assert_allclose(_np(plan.expert_weights), softmax_kept, atol=1e-6)
    gates = np.zeros_like(noisy)
    np.put_along_axis(gates, idx, softmax_kept, -1)
    np.testing.assert_allclose(
        float(_np(plan.aux_losses["importance"])), _cv2(gates.reshape(-1, 5).sum(0)), rtol=1e-4
    )
    load = _prob_in_top_k(clean, noisy, stddev, 2).reshape(-1, 5).sum(0)
    np.testing.assert_allclose(float(_np(plan.aux_losses["load"])), _cv2(load), rtol=1e-3)
    # Added with their weights (1e-2 each); the Switch loss weight is 0 here.
    assert len(router.losses) == 2


def test_masked_tokens_left_out_of_the_losses():
    router, twin = _router(seed=5), _router(seed=5)  # the same noise
    twin.kernel.assign(router.kernel)
    x = _inputs()
    mask = np.ones((2, 9), bool)
    mask[0, 5:] = False
    x_other = x.copy()
    x_other[0, 5:] = 100.0
    plan = router(x, token_mask=mask, training=True)
    other = twin(x_other, token_mask=mask, training=True)
    for name in ("importance", "load"):
        np.testing.assert_allclose(_np(plan.aux_losses[name]), _np(other.aux_losses[name]), rtol=1e-5)
    assert not _np(plan.dispatch_mask)[0, 5:].any()


def test_same_seed_same_routing():
    x = _inputs()
    plans = []
    kernel = np.random.default_rng(5).standard_normal((HIDDEN, 5)).astype("float32")
    for _ in range(2):
        router = _router(seed=11)
        router.kernel.assign(kernel)
        plans.append([_np(router(x, training=True).expert_indices) for _ in range(3)])
    for a, b in zip(*plans):
        np.testing.assert_array_equal(a, b)
    assert any((plans[0][0] != p).any() for p in plans[0][1:])  # the noise moves on


def test_config_round_trip_and_errors():
    router = NoisyTopKRouter(4, top_k=1, noise_epsilon=0.0, importance_loss_weight=0.1,
                             load_loss_weight=0.2, use_bias=True, seed=2)
    clone = NoisyTopKRouter.from_config(router.get_config())
    assert clone.get_config() == router.get_config()
    with pytest.raises(ValueError, match="score_func"):
        NoisyTopKRouter(4, score_func="sigmoid")
    with pytest.raises(ValueError, match="num_groups"):
        NoisyTopKRouter(4, num_groups=2)
    with pytest.raises(ValueError, match="noise_epsilon"):
        NoisyTopKRouter(4, noise_epsilon=-1.0)
    with pytest.raises(ValueError, match="load_loss_weight"):
        NoisyTopKRouter(4, load_loss_weight=-1.0)


def test_sparse_moe_noisy_gating_flag(tmp_path):
    layer = SparseMoE(4, 8, top_k=2, noisy_gating=True, load_balance_loss_weight=0.0, name="moe")
    assert isinstance(layer.router, NoisyTopKRouter)
    x = _inputs((4, 5, HIDDEN))
    model = keras.Sequential([keras.Input((5, HIDDEN)), layer])
    model.compile("adam", "mse")
    before = _np(layer.router.noise_kernel).copy()
    model.fit(x, x, epochs=2, batch_size=2, verbose=0)
    assert np.abs(_np(layer.router.noise_kernel) - before).max() > 0  # the noise is trained
    layer(x, training=True)
    assert len(layer.losses) == 2  # importance and load
    config = layer.get_config()
    assert config["noisy_gating"] and config["importance_loss_weight"] == 1e-2
    assert SparseMoE.from_config(config).get_config() == config
    path = str(tmp_path / "noisy.keras")
    model.save(path)
    np.testing.assert_allclose(_np(keras.models.load_model(path)(x)), _np(model(x)), atol=1e-6)


def test_sparse_moe_without_noise_has_no_noise_kernel_and_refuses_its_losses():
    layer = SparseMoE(4, 8)
    layer.build((None, HIDDEN))
    assert not hasattr(layer.router, "noise_kernel")  # older .keras files keep loading
    assert layer.get_config()["noisy_gating"] is False
    with pytest.raises(ValueError, match="importance_loss_weight.*noisy_gating"):
        SparseMoE(4, 8, importance_loss_weight=1e-2)
    with pytest.raises(ValueError, match="noise_epsilon"):
        SparseMoE(4, 8, noise_epsilon=0.1)
    with pytest.raises(ValueError, match="score_func"):
        SparseMoE(4, 8, noisy_gating=True, score_func="sigmoid")
