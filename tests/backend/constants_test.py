"""Device constants and counts (`keras_moe.backend.constants`) agree with keras.ops."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import backend as fast


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32"])
def test_scalar_like_value_dtype(dtype):
    x = ops.ones((3,), dtype)
    s = fast.scalar_like(2, x)
    assert tuple(s.shape) == ()
    assert ops.convert_to_numpy(ops.cast(s, "float32")) == 2.0
    assert ops.dtype(s) == ops.dtype(x)
    # In an op it gives what the Python number gives (no promotion).
    np.testing.assert_array_equal(
        ops.convert_to_numpy(ops.cast(ops.maximum(x, s), "float32")),
        ops.convert_to_numpy(ops.cast(ops.maximum(x, 2), "float32")),
    )
    assert ops.dtype(ops.maximum(x, s)) == ops.dtype(ops.maximum(x, 2))


def test_scalar_like_explicit_dtype():
    s = fast.scalar_like(float("nan"), ops.ones((2,), "int32"), dtype="float32")
    assert ops.dtype(s) == "float32"
    assert np.isnan(ops.convert_to_numpy(s))


@pytest.mark.parametrize("dtype", ["float32", "int32"])
def test_count_ids_matches_portable(dtype):
    ids = np.array([[0, 3], [3, 5], [2, -1], [5, 6], [3, 0]], "int32")  # 5, 6, -1: out of range
    fast_counts = ops.convert_to_numpy(fast.count_ids(ids, 5, dtype=dtype))
    portable = ops.convert_to_numpy(fast.count_ids(ids, 5, dtype=dtype, portable=True))
    expected = np.bincount(ids[(ids >= 0) & (ids < 5)], minlength=5)
    np.testing.assert_array_equal(fast_counts, expected)
    np.testing.assert_array_equal(portable, expected)
    assert ops.dtype(fast.count_ids(ids, 5, dtype=dtype)) == dtype


def test_count_ids_empty():
    counts = fast.count_ids(np.zeros((0, 2), "int32"), 4)
    np.testing.assert_array_equal(ops.convert_to_numpy(counts), np.zeros(4))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_segment_sum_matches_portable(dtype):
    rng = np.random.default_rng(0)
    data = ops.cast(rng.standard_normal((7, 3, 2)).astype("float32"), dtype)
    ids = np.array([2, 0, 2, 4, 1, 2, 0], "int32")  # segment 3 empty
    fast_sums = fast.segment_sum(data, ids, 5)
    portable = fast.segment_sum(data, ids, 5, portable=True)
    assert tuple(fast_sums.shape) == (5, 3, 2)
    assert ops.dtype(fast_sums) == dtype
    expected = np.zeros((5, 3, 2), "float32")
    np.add.at(expected, ids, ops.convert_to_numpy(ops.cast(data, "float32")))
    tol = 1e-2 if dtype == "bfloat16" else 1e-6
    np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(fast_sums, "float32")), expected, atol=tol)
    np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(portable, "float32")), expected, atol=tol)


def test_count_ids_where_matches_masking_by_hand():
    ids = np.array([[0, 3], [3, 1], [2, 0], [1, 1]], "int32")
    tokens = np.array([True, False, True, True])
    expected = np.bincount(ids[tokens].ravel(), minlength=4)
    for portable in (False, True):
        counts = fast.count_ids(ids, 4, portable=portable, where=tokens[:, None])
        np.testing.assert_array_equal(ops.convert_to_numpy(counts), expected)


def test_as_tensor_passes_backend_tensors_through():
    x = np.arange(6, dtype="float32").reshape(2, 3)
    t = fast.as_tensor(x)
    np.testing.assert_array_equal(ops.convert_to_numpy(t), x)
    assert fast.as_tensor(t) is t or keras.backend.backend() != "torch"
    v = keras.Variable(x)
    np.testing.assert_array_equal(ops.convert_to_numpy(fast.as_tensor(v)), x)
