"""The routing plan's integer tables in a few PyTorch operators.

`keras_moe.dispatch.blocks.plan_rows` lays the `N = tokens * k`
assignments out as per-expert rows with one stable sort and arithmetic, in
`keras.ops`. Keras runs PyTorch eagerly: each `keras.ops` call costs the
host its conversions and structure checks (`any_symbolic_tensors` flattens
every argument) on top of one or more ATen operators, and on a GPU the
host launches every kernel. The plan is ~115 such operators that all run
before the first expert matmul, so in an eager GPU step the device waits
for them: the host's part of the step there is time the GPU sits idle.

`plan_tables` builds the same tables with direct PyTorch calls (~30
operators, no Keras dispatch): `torch.sort(stable=True)` for the order,
`searchsorted` on the sorted experts for the counts (no `bincount`, whose
CUDA version reads its maximum back to the host), and a `scatter_` for the
inverse permutation instead of a second argsort. Every shape is static, so
`torch.compile` traces it as one graph. Elsewhere it returns `None` and
the portable `keras.ops` version runs; tests check that both agree.
"""

import keras

from keras_moe.backend.constants import as_tensor


def plan_tables(expert_indices, valid, num_experts, block_size, portable=False):
    """The tables of `blocks.plan_rows` on PyTorch, else `None`.

    Args:
        expert_indices: `(tokens, k)` int tensor.
        valid: `(tokens, k)` bool tensor, False for assignments not to compute.
        num_experts: int `E`.
        block_size: int `B`.
        portable: bool, return `None` (the caller's `keras.ops` version).

    Returns:
        `None`, or the tuple `(row_tokens, assignment_rows, row_assignments,
        row_experts, group_sizes, block_experts)` of int32 tensors, as the
        fields of `keras_moe.dispatch.blocks.RowPlan`.
    """
    if portable or keras.backend.backend() != "torch":
        return None
    import torch

    indices = as_tensor(expert_indices)
    valid = as_tensor(valid).to(device=indices.device, dtype=torch.bool)
    tokens, k = int(indices.shape[0]), int(indices.shape[1])
    num, E, B = tokens * k, num_experts, block_size
    num_blocks = -(-num // B) + E - 1  # enough for any routing
    rows = num_blocks * B
    device = indices.device
    long = torch.int64

    # Invalid assignments get expert E and sort last; the sort is stable.
    experts = torch.where(valid, indices.to(long), E).reshape(-1)
    sorted_experts, order = torch.sort(experts, stable=True)
    # Each expert's first sorted index and count, from the sorted experts.
    bounds = torch.searchsorted(sorted_experts, torch.arange(E + 1, device=device, dtype=long))
    starts, counts = bounds[:-1], bounds[1:] - bounds[:-1]
    padded = (counts + (B - 1)) // B * B
    padded_ends = torch.cumsum(padded, 0)
    padded_starts = padded_ends - padded

    # Row -> sorted assignment, by arithmetic (gathers only).
    block_starts = torch.arange(num_blocks, device=device, dtype=long) * B
    block_experts = torch.searchsorted(padded_ends, block_starts, right=True).clamp_(max=E - 1)
    row_experts = block_experts.repeat_interleave(B)  # (R,), a static repeat count
    offset = torch.arange(rows, device=device, dtype=long) - padded_starts[row_experts]
    filled = offset < counts[row_experts]
    sorted_index = (starts[row_experts] + offset).clamp_(max=num - 1)
    row_assignments = torch.where(filled, order[sorted_index], num)
    row_tokens = torch.where(filled, torch.div(row_assignments, k, rounding_mode="floor"), tokens)

    # Assignment -> row: each sorted assignment's row, then un-sorted by
    # scattering through the permutation (no second sort).
    expert = sorted_experts.clamp(max=E - 1)
    rank = torch.arange(num, device=device, dtype=long) - starts[expert]
    sorted_rows = torch.where(sorted_experts < E, padded_starts[expert] + rank, rows)
    assignment_rows = torch.empty_like(sorted_rows).scatter_(0, order, sorted_rows)

    int32 = torch.int32
    return (
        row_tokens.to(int32),
        assignment_rows.reshape(tokens, k).to(int32),
        row_assignments.to(int32),
        row_experts.to(int32),
        padded.to(int32),
        block_experts.to(int32),
    )
