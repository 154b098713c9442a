"""Dispatch layouts agree with each other and with the capacity rules."""

import keras
import numpy as np
import pytest

from keras_moe import backend as fast
from keras_moe import dispatch
from keras_moe.experts import StackedExperts


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _routing(tokens, k, num_experts, seed=0):
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(tokens)])
    weights = rng.random((tokens, k)).astype("float32")
    return indices.astype("int32"), weights


def _dense_reference(experts, x, indices, weights, valid):
    """Every expert on every token, then pick: the thing dispatch avoids."""
    all_out = _np(experts(np.broadcast_to(x, (experts.num_experts,) + x.shape)))  # (E, T, d)
    out = np.zeros_like(x)
    for t in range(len(x)):
        for j in range(indices.shape[1]):
            if valid[t, j]:
                out[t] += weights[t, j] * all_out[indices[t, j], t]
    return out


@pytest.mark.parametrize("strategy", ["grouped", "scan", "batched"])
@pytest.mark.parametrize("gated, use_bias", [(False, False), (True, True)])
def test_dropless_matches_dense_reference(gated, use_bias, strategy):
    if strategy == "grouped" and not fast.has_grouped_matmul():
        pytest.skip("no grouped-matmul fast path on this backend/device")
    tokens, k, E, d = 37, 2, 5, 6
    x = np.random.default_rng(1).standard_normal((tokens, d)).astype("float32")
    indices, weights = _routing(tokens, k, E)
    valid = np.ones((tokens, k), bool)
    valid[-4:] = False
    experts = StackedExperts(E, 7, gated=gated, use_bias=use_bias, bias_initializer="random_normal")
    experts.build((None, d))
    out = _np(dispatch.dispatch_dropless(x, indices, weights, valid, experts, strategy=strategy))
    np.testing.assert_allclose(out, _dense_reference(experts, x, indices, weights, valid), atol=1e-5)


def test_blocks_and_grouped_fast_path_agree():
    """The portable blocks layout and the backend fast path, when present."""
    tokens, k, E, d = 50, 2, 6, 4
    x = np.random.default_rng(2).standard_normal((tokens, d)).astype("float32")
    indices, _ = _routing(tokens, k, E, seed=3)
    indices[:20] = 0  # a crowded expert, and probably an empty one
    valid = np.ones((tokens, k), bool)
    valid[::7] = False
    experts = StackedExperts(E, 5, gated=True, use_bias=True, bias_initializer="random_normal")
    experts.build((None, d))
    order, row_experts, group_sizes = dispatch.sort_by_expert(indices, valid, E)
    x_sorted = _np(keras.ops.take(x, keras.ops.convert_to_tensor(_np(order) // k), axis=0))
    real = int(valid.sum())
    for block_size in (1, 4, 32):
        x_blocks, block_experts, block_sizes, dest = dispatch.to_blocks(
            x_sorted, row_experts, group_sizes, E, block_size
        )
        assert (_np(block_sizes) % block_size == 0).all()
        assert (_np(block_sizes) >= _np(group_sizes)).all()
        y = _np(dispatch.from_blocks(experts.call_blocks(x_blocks, block_experts), dest))
        expected = np.stack([
            _np(experts(np.broadcast_to(x_sorted[i], (E, 1, d))))[e, 0]
            for i, e in enumerate(_np(row_experts)[:real])
        ])
        np.testing.assert_allclose(y[:real], expected, atol=1e-5)
        assert np.all(y[real:] == 0)
    if fast.has_grouped_matmul():
        y_fast = _np(experts.call_grouped(x_sorted, row_experts, group_sizes))
        np.testing.assert_allclose(y_fast[:real], expected, atol=1e-5)


def test_sort_by_expert_is_stable_and_counts():
    indices = np.array([[2, 0], [0, 1], [2, 1], [0, 2]], "int32")
    valid = np.array([[True, True], [True, True], [False, False], [True, True]])
    order, row_experts, sizes = dispatch.sort_by_expert(indices, valid, 3)
    np.testing.assert_array_equal(_np(sizes), [3, 1, 2])
    np.testing.assert_array_equal(_np(order), [1, 2, 6, 3, 0, 7, 4, 5])
    np.testing.assert_array_equal(_np(row_experts), [0, 0, 0, 1, 2, 2, 3, 3])


def test_slot_sources_invert_slots():
    slots = np.array([[0, 4, 1, 5, 3, 6, 2, 6]], "int32")  # E=2, C=3, trash=6
    sources, filled = dispatch.slot_sources(slots, 2, 3)
    np.testing.assert_array_equal(_np(filled)[0], [True, True, True, True, True, True])
    np.testing.assert_array_equal(_np(sources)[0], [0, 2, 6, 4, 1, 3])
    sources, filled = dispatch.slot_sources(np.array([[6, 0, 6, 3]], "int32"), 2, 3)
    np.testing.assert_array_equal(_np(filled)[0], [True, False, False, True, False, False])
    np.testing.assert_array_equal(_np(sources)[0][_np(filled)[0]], [1, 3])


def test_capacity_slots_order():
    # One group of 4 tokens, k=2, 2 experts, capacity 3.
    indices = np.array([[[0, 1], [0, 1], [1, 0], [0, 1]]], "int32")
    valid = np.ones((1, 4, 2), bool)
    slots, dispatched = dispatch.capacity_slots(indices, valid, 2, 3)
    # First choices: expert 0 gets tokens 0, 1, 3 (slots 0-2), expert 1 token 2.
    # Second choices: expert 1 gets tokens 0, 1 (slots 4, 5); the rest drop.
    np.testing.assert_array_equal(_np(slots)[0], [[0, 4], [1, 5], [3, 6], [2, 6]])
    np.testing.assert_array_equal(
        _np(dispatched)[0], [[True, True], [True, True], [True, False], [True, False]]
    )


def test_compute_capacity():
    assert dispatch.compute_capacity(1.25, 4096, 2, 8) == 1280
    assert dispatch.compute_capacity(1.0, 3, 1, 8) == 1
    assert dispatch.compute_capacity(0.01, 10, 1, 4) == 1


def test_dropless_under_compilation_matches_eager():
    """TF under XLA and JAX under jit take static layouts, gradients too."""
    from keras_moe.layers import SparseMoE

    layer = SparseMoE(4, 8, gated=True, activation="silu")
    x = np.random.default_rng(4).standard_normal((2, 9, 8)).astype("float32")
    eager = _np(layer(x))
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def loss_and_grads(t):
            with tf.GradientTape() as tape:
                y = layer(t, training=True)
                loss = tf.reduce_mean(y**2)
            return y, tape.gradient(loss, [v.value for v in layer.trainable_variables])

        y, grads = tf.function(loss_and_grads, jit_compile=True)(x)
        _, eager_grads = loss_and_grads(tf.constant(x))
    elif backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, t):
            y = layer.stateless_call(trainable, non_trainable, t, training=True)[0]
            return (y**2).mean(), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable, x)
        (_, _), eager_grads = jax.value_and_grad(loss, has_aux=True)(trainable, x)
    else:
        pytest.skip("Keras' torch backend runs eagerly")
    np.testing.assert_allclose(_np(y), eager, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        np.testing.assert_allclose(_np(g), _np(e), atol=1e-5)
