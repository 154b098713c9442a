"""`MoE(..., router_inputs=...)`: route one view of the tokens, transform another."""

import keras
import numpy as np
import pytest

import keras_moe


def _layer(capacity_factor=None):
    return keras_moe.layers.MoE(
        router=keras_moe.routers.TopKRouter(num_experts=4, top_k=2),
        experts=keras_moe.experts.StackedExperts(num_experts=4, intermediate_dim=8),
        capacity_factor=capacity_factor,
    )


@pytest.mark.parametrize("capacity_factor", [None, 2.0])
def test_router_sees_router_inputs_experts_see_inputs(capacity_factor):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6)).astype("float32")
    r = rng.standard_normal((2, 5, 6)).astype("float32")
    layer = _layer(capacity_factor)
    layer(x)
    out, routing = layer(x, router_inputs=r, return_routing=True)
    # The routing is the one the router makes on `r`...
    _, on_r = layer(r, return_routing=True)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(routing["expert_indices"]),
        keras.ops.convert_to_numpy(on_r["expert_indices"]),
    )
    # ...and the experts transform `x`: each token's output is the weighted
    # sum of its chosen experts applied to x.
    indices = keras.ops.convert_to_numpy(routing["expert_indices"]).reshape(-1, 2)
    weights = keras.ops.convert_to_numpy(routing["expert_weights"]).reshape(-1, 2)
    flat = x.reshape(-1, 6)
    buffer = np.broadcast_to(flat, (4,) + flat.shape)
    per_expert = keras.ops.convert_to_numpy(layer.experts(buffer))  # (E, T, hidden)
    expected = sum(
        weights[:, j : j + 1] * per_expert[indices[:, j], np.arange(len(flat))] for j in range(2)
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(out).reshape(-1, 6), expected, rtol=1e-5, atol=1e-5
    )


def test_router_inputs_must_match_the_inputs():
    layer = _layer()
    x = np.zeros((2, 5, 6), "float32")
    with pytest.raises(ValueError, match="`router_inputs` must have the shape of the inputs"):
        layer(x, router_inputs=np.zeros((2, 4, 6), "float32"))
