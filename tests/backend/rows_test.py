"""Per-expert row pieces and row gathers (`keras_moe.backend.rows`) agree with keras.ops."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import backend as fast


def _pieces(t, sizes, portable):
    return [ops.convert_to_numpy(p) for p in fast.split_rows(t, sizes, portable=portable)]


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("sizes", [[2, 0, 3], [1, 4, 2], [0, 0, 0]])
def test_split_rows_pieces(sizes, portable):
    t = np.arange(7 * 3, dtype="float32").reshape(7, 3)
    starts = np.cumsum([0] + sizes)
    expected = [t[a : a + n] for a, n in zip(starts, sizes)]
    for tensor_sizes in (False, True):
        given = ops.convert_to_tensor(np.array(sizes, "int32")) if tensor_sizes else sizes
        got = _pieces(t, given, portable)
        assert len(got) == len(sizes)
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            np.testing.assert_array_equal(g, e)


def test_split_rows_one_dimensional_and_in_a_tf_graph():
    t = np.arange(6, dtype="int32")
    sizes = np.array([3, 1, 2], "int32")
    fast_pieces = _pieces(t, list(sizes), False)
    portable = _pieces(t, ops.convert_to_tensor(sizes), True)
    for f, p in zip(fast_pieces, portable):
        np.testing.assert_array_equal(f, p)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # Dynamic sizes in a graph: one tf.split.
        split = tf.function(lambda t, s: fast.split_rows(t, s))
        for f, g in zip(fast_pieces, split(tf.constant(t), tf.constant(sizes))):
            np.testing.assert_array_equal(f, g.numpy())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gather_rows_matches_take(dtype):
    table = ops.cast(np.random.default_rng(0).standard_normal((5, 2, 3)).astype("float32"), dtype)
    indices = np.array([4, 0, 0, 2], "int32")
    got = fast.gather_rows(table, indices)
    portable = fast.gather_rows(table, indices, portable=True)
    assert tuple(got.shape) == (4, 2, 3)
    assert ops.dtype(got) == dtype
    np.testing.assert_array_equal(
        ops.convert_to_numpy(ops.cast(got, "float32")),
        ops.convert_to_numpy(ops.cast(portable, "float32")),
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(ops.cast(got, "float32")),
        ops.convert_to_numpy(ops.cast(ops.take(table, indices, axis=0), "float32")),
    )
