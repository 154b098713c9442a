"""Stacked contractions are right for every stack size, one included.

TensorFlow's oneDNN batched matmul crashed (segfault, heap corruption) or
returned wrong values when a batch dimension broadcast against a size-1
stack: `einsum("...ecd,edh->...ech")` with `E = 1`. These cases ran that code.
"""

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe.experts.contractions import shared_input_matmul
from keras_moe.experts.contractions import stacked_matmul


def _np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize(
    "x_shape, axis",
    [
        ((12, 1, 2, 4), -3),  # the shape that segfaulted
        ((2, 1, 9, 4), -3),
        ((3, 2, 1, 5, 4), -3),
        ((1, 1, 1, 4), -3),
        ((5, 1, 4), -2),
        ((5, 7, 3, 4), -2),
    ],
)
def test_stacked_matmul_matches_numpy(x_shape, axis):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype("float32")
    stacks = x_shape[axis]
    kernels = rng.standard_normal((stacks, 4, 6)).astype("float32")
    moved = np.moveaxis(x, axis, 0)
    expected = np.moveaxis(np.einsum("s...d,sdh->s...h", moved, kernels), 0, axis)
    for _ in range(3):  # the crash needed a few calls to show
        np.testing.assert_allclose(_np(stacked_matmul(x, kernels, axis=axis)), expected, atol=1e-5)


@pytest.mark.parametrize("stacks", [1, 3])
def test_shared_input_matmul_matches_numpy(stacks):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 2, 4)).astype("float32")
    kernels = rng.standard_normal((stacks, 4, 6)).astype("float32")
    np.testing.assert_allclose(
        _np(shared_input_matmul(x, kernels)), np.einsum("...d,sdh->...sh", x, kernels), atol=1e-5
    )


def test_one_expert_with_capacity_runs_and_is_right():
    """`SparseMoE(1, ...)` with a capacity factor crashed TensorFlow."""
    from tests.layers.sparse_moe_test import reference_outputs

    layer = keras_moe.layers.SparseMoE(1, 6, top_k=1, capacity_factor=1.5, group_size=4)
    x = np.random.default_rng(2).standard_normal((1, 12, 4)).astype("float32")
    for _ in range(3):
        y, routing = layer(x, return_routing=True)
    np.testing.assert_allclose(
        _np(y).reshape(-1, 4), reference_outputs(layer, x, routing), atol=1e-5
    )


@pytest.mark.parametrize("num_tasks, num_experts", [(1, 1), (1, 3), (2, 1)])
def test_multitask_layers_with_one_stack(num_tasks, num_experts):
    x = np.random.default_rng(3).standard_normal((5, 4)).astype("float32")
    mmoe = keras_moe.layers.MMoE(num_tasks, num_experts, [6, 3], gate_units=[5])
    for _ in range(3):
        outputs = mmoe(x)
    assert len(outputs) == num_tasks and tuple(outputs[0].shape) == (5, 3)
    ple = keras_moe.layers.PLE(num_tasks, num_levels=2, num_task_experts=num_experts,
                               num_shared_experts=1, expert_units=3)
    for _ in range(3):
        outputs = ple(x)
    assert len(outputs) == num_tasks
