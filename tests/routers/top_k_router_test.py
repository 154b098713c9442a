"""TopKRouter on its own: it only decides, and it round-trips."""

import keras
import numpy as np
import pytest

from keras_moe.routers import TopKRouter


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_plan_shapes_and_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    router = TopKRouter(num_experts=6, top_k=2)  # dtype defaults to float32
    x = np.random.default_rng(0).standard_normal((5, 8)).astype("float32")
    plan = router(keras.ops.cast(x, "bfloat16"))
    assert tuple(plan["router_logits"].shape) == (5, 6)
    assert tuple(plan["expert_indices"].shape) == (5, 2)
    for key in ("router_logits", "router_probs", "expert_weights"):
        assert keras.backend.standardize_dtype(plan[key].dtype) == "float32"
    assert keras.backend.standardize_dtype(plan["expert_indices"].dtype) == "int32"
    np.testing.assert_allclose(_np(plan["expert_weights"]).sum(-1), 1.0, rtol=1e-6)


def test_router_bias_and_config_round_trip():
    router = TopKRouter(8, top_k=2, score_func="sigmoid", num_groups=4, top_groups=2, use_bias=True,
                        routed_scaling_factor=2.5, jitter=0.1, expert_bias_update_rate=1e-3, seed=3)
    router.build((None, 8))
    assert tuple(router.bias.shape) == (8,) and not router.expert_bias.trainable
    clone = TopKRouter.from_config(router.get_config())
    assert clone.get_config() == router.get_config()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(4, top_k=5)
    with pytest.raises(ValueError, match="num_groups"):
        TopKRouter(6, num_groups=4)
