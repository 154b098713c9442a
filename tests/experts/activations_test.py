"""Expert activations: the clamped SwiGLU (GPT-OSS) and tanh-GELU."""

import os

import keras
import numpy as np
import pytest

from keras_moe.experts import ClampedSwiGLU
from keras_moe.experts import FeedForward
from keras_moe.experts import StackedExperts
from keras_moe.experts import activations
from keras_moe.layers import SparseMoE


def _reference(gate, up, alpha=1.702, limit=7.0):
    gate = np.minimum(gate, limit)
    up = np.clip(up, -limit, limit)
    return (up + 1.0) * gate / (1.0 + np.exp(-alpha * gate))


def test_clamped_swiglu_values():
    rng = np.random.default_rng(0)
    gate = (8 * rng.standard_normal((4, 6))).astype("float32")  # some beyond the clamp
    up = (8 * rng.standard_normal((4, 6))).astype("float32")
    for act in (ClampedSwiGLU(), activations.get("clamped_swiglu")):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(act(gate, up)), _reference(gate, up), rtol=1e-5, atol=1e-5
        )
    custom = ClampedSwiGLU(alpha=1.0, limit=2.0)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(custom(gate, up)),
        _reference(gate, up, 1.0, 2.0),
        rtol=1e-5,
        atol=1e-5,
    )


def test_gated_experts_use_the_gated_activation():
    x = np.random.default_rng(1).standard_normal((3, 5)).astype("float32")
    experts = StackedExperts(num_experts=2, intermediate_dim=4, gated=True, use_bias=True,
                             activation="clamped_swiglu")
    buffer = np.stack([x, x])  # (E, C, hidden): both experts see x
    out = keras.ops.convert_to_numpy(experts(buffer))
    for e in range(2):
        w = lambda name: keras.ops.convert_to_numpy(getattr(experts, name))[e]  # noqa: E731
        hidden = _reference(x @ w("gate_kernel") + w("gate_bias"), x @ w("up_kernel") + w("up_bias"))
        np.testing.assert_allclose(out[e], hidden @ w("down_kernel") + w("down_bias"), rtol=1e-5, atol=1e-5)
    ffn = FeedForward(intermediate_dim=4, gated=True, activation=ClampedSwiGLU(limit=3.0))
    ffn(x)
    k = {n: keras.ops.convert_to_numpy(getattr(ffn, n)) for n in ("gate_kernel", "up_kernel", "down_kernel")}
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ffn(x)),
        _reference(x @ k["gate_kernel"], x @ k["up_kernel"], limit=3.0) @ k["down_kernel"],
        rtol=1e-5,
        atol=1e-5,
    )


def test_serialization(tmp_path):
    x = np.random.default_rng(2).standard_normal((2, 4, 8)).astype("float32")
    for activation in (ClampedSwiGLU(alpha=1.5, limit=5.0), "clamped_swiglu", "gelu_approximate"):
        model = keras.Sequential([
            keras.Input((4, 8)),
            SparseMoE(num_experts=4, intermediate_dim=6, gated=True, use_bias=True,
                      activation=activation, shared_intermediate_dim=4),
        ])
        expected = keras.ops.convert_to_numpy(model(x))
        path = os.path.join(tmp_path, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), expected)
    restored = keras.activations.get(keras.activations.serialize(ClampedSwiGLU(limit=5.0)))
    assert isinstance(restored, ClampedSwiGLU) and restored.limit == 5.0
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(activations.get("gelu_approximate")(x)),
        keras.ops.convert_to_numpy(keras.activations.gelu(x, approximate=True)),
    )


def test_invalid_arguments():
    with pytest.raises(ValueError, match="needs `gated=True`"):
        StackedExperts(num_experts=2, intermediate_dim=4, activation="clamped_swiglu")
    with pytest.raises(ValueError, match="needs `gated=True`"):
        SparseMoE(num_experts=2, intermediate_dim=4, activation=ClampedSwiGLU())
    with pytest.raises(ValueError, match="limit"):
        ClampedSwiGLU(limit=0)
    with pytest.raises(ValueError, match="alpha"):
        ClampedSwiGLU(alpha=-1.0)
