"""The routing plan's direct PyTorch tables (`keras_moe.backend.plan_tables`) equal the keras.ops plan."""

import keras
import numpy as np
import pytest

from keras_moe import backend as fast
from keras_moe.dispatch import blocks


def _np(t):
    return keras.ops.convert_to_numpy(t)


@pytest.mark.parametrize(
    "tokens,k,num_experts,block_size,invalid",
    [
        (37, 2, 5, 8, 0.2),  # the grouped strategy's blocks
        (40, 3, 7, 1, 0.0),  # exact ranges, every assignment valid
        (16, 1, 4, 4, 1.0),  # nothing valid: all rows padding
        (25, 1, 1, 2, 0.5),  # one expert
        (64, 4, 16, 16, 0.1),  # more experts than some get rows
    ],
)
def test_plan_tables_match_portable_plan(tokens, k, num_experts, block_size, invalid):
    rng = np.random.default_rng(tokens * 7 + k)
    # Distinct experts per token, some experts crowded, some unused.
    scores = rng.random((tokens, num_experts)) + np.arange(num_experts)[::-1] * 0.3
    indices = np.argsort(-scores, axis=-1)[:, :k].astype("int32")
    valid = rng.random((tokens, k)) >= invalid
    fast_plan = blocks.plan_rows(indices, valid, num_experts, block_size)
    portable = blocks.plan_rows(indices, valid, num_experts, block_size, portable=True)
    assert fast_plan.block_size == portable.block_size == block_size
    assert fast_plan.num_experts == portable.num_experts == num_experts
    for name in blocks.PLAN_TENSORS:
        got, want = getattr(fast_plan, name), getattr(portable, name)
        assert keras.backend.standardize_dtype(got.dtype) == "int32", name
        assert tuple(got.shape) == tuple(want.shape), name
        np.testing.assert_array_equal(_np(got), _np(want), err_msg=name)


def test_plan_tables_only_on_torch():
    indices = np.array([[1, 0], [0, 2]], "int32")
    valid = np.ones((2, 2), bool)
    tables = fast.plan_tables(indices, valid, 3, 2)
    assert (tables is not None) == (keras.backend.backend() == "torch")
    assert fast.plan_tables(indices, valid, 3, 2, portable=True) is None
