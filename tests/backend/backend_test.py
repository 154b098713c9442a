"""Backend fast paths agree with their portable versions."""

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe import backend as fast


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _grads(fn, args):
    """Gradients of `sum(fn(*args))` by the backend's autodiff."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return list(jax.grad(lambda *a: keras.ops.sum(fn(*a)), range(len(args)))(*args))
    if backend == "tensorflow":
        import tensorflow as tf

        args = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            for a in args:
                tape.watch(a)
            value = keras.ops.sum(fn(*args))
        return tape.gradient(value, args)
    import torch

    args = [torch.tensor(a, requires_grad=True) for a in args]
    keras.ops.sum(fn(*args)).backward()
    return [a.grad for a in args]


def _scaled_take(x, w, index):
    """Rows of `x` at `index`, times `w`: float arguments first, indices last."""
    return keras.ops.take(x, index, axis=0) * keras.ops.expand_dims(w, -1)


def _scaled_take_backward(upstream, x, w, index):
    rows = keras.ops.take(x, index, axis=0)
    d_x = keras.ops.segment_sum(
        upstream * keras.ops.expand_dims(w, -1), index, num_segments=keras.ops.shape(x)[0]
    )
    return d_x, keras.ops.sum(upstream * rows, axis=-1)


@pytest.mark.parametrize("portable", [False, True])
def test_custom_gradient_agrees_with_autodiff(portable):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3)).astype("float32")
    w = rng.standard_normal((7,)).astype("float32")
    index = np.array([0, 4, 4, 1, 2, 0, 3], "int32")
    fn = fast.custom_gradient(_scaled_take, _scaled_take_backward, 2, portable=portable)
    np.testing.assert_allclose(_np(fn(x, w, index)), _np(_scaled_take(x, w, index)), atol=1e-6)
    grads = _grads(lambda x, w: fn(x, w, index), [x, w])
    expected = _grads(lambda x, w: _scaled_take(x, w, index), [x, w])
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(_np(g), _np(e), atol=1e-5)


def test_custom_gradient_several_outputs_and_zero_gradients():
    x = np.arange(6, dtype="float32").reshape(2, 3)
    y = np.ones((2, 3), "float32")

    def forward(x, y):
        return x * 2.0, x * y

    def backward(upstream, x, y):
        d_double, d_product = upstream
        return d_double * 2.0 + d_product * y, None  # y's gradient left out: zeros

    fn = fast.custom_gradient(forward, backward, 2)
    grads = _grads(lambda x, y: sum(fn(x, y)), [x, y])
    np.testing.assert_allclose(_np(grads[0]), np.full((2, 3), 3.0), atol=1e-6)
    # torch leaves a gradient it never received as None.
    assert grads[1] is None or np.all(_np(grads[1]) == 0)


def test_vjp_of_an_activation():
    rng = np.random.default_rng(1)
    u, g, cotangent = rng.standard_normal((3, 4, 5)).astype("float32")
    u, g, cotangent = (keras.ops.convert_to_tensor(t) for t in (u, g, cotangent))

    def swiglu(u, g):
        return keras.activations.silu(g) * u

    out, vjp_fn = fast.vjp(swiglu, u, g)
    d_u, d_g = vjp_fn(cotangent)
    sig = 1 / (1 + np.exp(-_np(g)))
    np.testing.assert_allclose(_np(out), _np(g) * sig * _np(u), atol=1e-6)
    np.testing.assert_allclose(_np(d_u), _np(cotangent) * _np(g) * sig, atol=1e-5)
    d_silu = sig * (1 + _np(g) * (1 - sig))
    np.testing.assert_allclose(_np(d_g), _np(cotangent) * _np(u) * d_silu, atol=1e-5)


def test_in_place_writes_agree_with_portable():
    rng = np.random.default_rng(2)
    table = rng.standard_normal((6, 3)).astype("float32")
    rows = rng.standard_normal((4, 3)).astype("float32")
    index = keras.ops.convert_to_tensor(np.array([5, 0, 5, 2], "int32"))  # a duplicate adds up
    expected = table.copy()
    np.add.at(expected, [5, 0, 5, 2], rows)
    for portable in (True, False):
        out = fast.add_rows(keras.ops.convert_to_tensor(table.copy()), index, rows, portable)
        np.testing.assert_allclose(_np(out), expected, atol=1e-6)
        buffer = keras.ops.zeros((6, 3))
        out = fast.write_slice(buffer, (2, 0), keras.ops.convert_to_tensor(rows[:3]), portable)
        np.testing.assert_allclose(_np(out)[2:5], rows[:3])
        assert np.all(_np(out)[[0, 1, 5]] == 0)
    assert isinstance(fast.eager_shapes(), bool)


@pytest.mark.skipif(not fast.has_grouped_matmul(), reason="no grouped-matmul fast path here")
def test_grouped_matmul_and_outer_match_per_group_loops():
    rng = np.random.default_rng(3)
    # Multiples of 8 rows (torch._grouped_mm's alignment), an empty group, padding rows.
    sizes = np.array([8, 0, 16, 8], "int32")
    x = rng.standard_normal((40, 4)).astype("float32")
    g = rng.standard_normal((40, 6)).astype("float32")
    kernels = rng.standard_normal((4, 4, 6)).astype("float32")
    starts = np.cumsum(sizes) - sizes
    y = _np(fast.grouped_matmul(x, kernels, sizes))
    outer = _np(fast.grouped_outer(x, g, sizes))
    for e, (s, n) in enumerate(zip(starts, sizes)):
        np.testing.assert_allclose(y[s : s + n], x[s : s + n] @ kernels[e], atol=1e-5)
        np.testing.assert_allclose(outer[e], x[s : s + n].T @ g[s : s + n], atol=1e-5)


def test_eager_jit_agrees_with_the_eager_computation_and_reads_each_layers_weights():
    from keras_moe.backend import eager as eager_module
    from keras_moe.experts import StackedExperts

    x = np.random.default_rng(0).standard_normal((6, 8)).astype("float32")
    indices = np.array([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1]], "int32")
    weights = np.full((6, 2), 0.5, "float32")
    valid = np.ones((6, 2), bool)
    valid[3] = False

    def run(experts, x, indices, weights, valid):
        return keras_moe.dispatch.dispatch_dropless(
            x, indices, weights, valid, experts, strategy="batched"
        )

    layers = []
    for seed in (1, 2):
        experts = StackedExperts(3, 4, gated=True, seed=seed)
        experts.build((None, 8))
        layers.append(experts)
    for experts in layers:
        compiled = eager_module.eager_jit(experts, "test", run, x, indices, weights, valid)
        if keras.backend.backend() != "jax":
            assert compiled is None
            continue
        # The portable computation: the same function, outside the cache.
        with keras.StatelessScope(state_mapping=[(v, v.value) for v in experts.variables]):
            expected = run(experts, x, indices, weights, valid)
        np.testing.assert_allclose(_np(compiled), _np(expected), atol=1e-6)
    if keras.backend.backend() == "jax":
        # Two layers configured alike share one program, each with its weights.
        first = eager_module.eager_jit(layers[0], "test", run, x, indices, weights, valid)
        second = eager_module.eager_jit(layers[1], "test", run, x, indices, weights, valid)
        assert np.abs(_np(first) - _np(second)).max() > 1e-3
