"""Dropless dispatch: every routed assignment is computed exactly once."""

from keras import ops

from keras_moe import backend as fast
from keras_moe.dispatch import blocks


def sort_by_expert(expert_indices, valid, num_experts):
    """Orders the `N = tokens * k` assignments by expert, stably.

    Args:
        expert_indices: `(tokens, k)` int32.
        valid: `(tokens, k)` bool; invalid assignments sort last.
        num_experts: int `E`.

    Returns:
        `(order (N,), row_experts (N,), group_sizes (E,))`, all int32:
        `order[i]` is the flat assignment index (`token * k + j`) of sorted
        row `i`, `row_experts[i]` its expert (`E` for invalid ones).
    """
    experts = ops.where(valid, expert_indices, num_experts)
    experts = ops.cast(ops.reshape(experts, (-1,)), "int32")
    num = ops.shape(experts)[0]
    # Unique keys make the sort stable on every backend (TF's argsort is not).
    keys = experts * num + ops.arange(num, dtype="int32")
    order = ops.cast(ops.argsort(keys), "int32")
    row_experts = ops.take(experts, order)
    group_sizes = ops.segment_sum(
        ops.ones_like(experts), experts, num_segments=num_experts + 1, sorted=False
    )[:num_experts]
    return order, row_experts, ops.cast(group_sizes, "int32")


STRATEGIES = ("grouped", "scan", "batched")


def default_strategy():
    """How dropless dispatch runs the experts on this backend and device.

    - `"grouped"`: rows through the backend's grouped matmul
      (`keras_moe.backend.grouped_matmul`): the default on CPUs where there
      is one (PyTorch's `torch._grouped_mm`, TensorFlow graphs outside XLA).
    - `"scan"`: per-expert blocks, a scan of dense matmuls: the default on
      CPUs without a grouped matmul (JAX, TensorFlow under XLA).
    - `"batched"`: per-expert blocks, one batched einsum over per-block
      copies of the kernels: the default on GPUs and TPUs. On an H100 it
      beat `jax.lax.ragged_dot` (1.7 vs 3.4 ms per training step, E=8,
      k=2, T=4096) and `torch._grouped_mm` (10.0 vs 13.7 ms).
    """
    if fast.on_accelerator():
        return "batched"
    return "grouped" if fast.has_grouped_matmul() else "scan"


def dispatch_dropless(x, expert_indices, expert_weights, valid, experts, training=None, strategy=None):
    """Runs every valid assignment through its expert and combines.

    Args:
        x: `(tokens, hidden)`.
        expert_indices: `(tokens, k)` int32.
        expert_weights: `(tokens, k)` combine weights.
        valid: `(tokens, k)` bool, False for masked tokens.
        experts: a `StackedExperts`.
        strategy: one of `STRATEGIES`, or `None` for `default_strategy()`.

    Returns:
        `outputs (tokens, hidden)`.
    """
    x = ops.convert_to_tensor(x)
    tokens, hidden = ops.shape(x)
    k = ops.shape(expert_indices)[1]
    num_experts = experts.num_experts
    strategy = strategy or default_strategy()
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}. Received: strategy={strategy!r}")
    order, row_experts, group_sizes = sort_by_expert(expert_indices, valid, num_experts)
    x_sorted = ops.take(x, order // k, axis=0)  # (N, hidden)

    if strategy == "grouped":
        block_size = 8  # keeps every group 16-byte aligned
    else:
        block_size = blocks.block_size_for(ops.shape(x_sorted)[0], num_experts)
    x_blocks, block_experts, block_sizes, destinations = blocks.to_blocks(
        x_sorted, row_experts, group_sizes, num_experts, block_size
    )
    if strategy == "grouped":
        rows = ops.reshape(x_blocks, (-1, hidden))
        y_rows = experts.call_grouped(
            rows, ops.repeat(block_experts, block_size), block_sizes, training=training
        )
        y_blocks = ops.reshape(y_rows, ops.shape(x_blocks))
    else:
        y_blocks = experts.call_blocks(
            x_blocks, block_experts, training=training, gather_weights=strategy == "batched"
        )
    y_sorted = blocks.from_blocks(y_blocks, destinations)  # (N, hidden)

    # Undo the sort (the inverse of a permutation is its argsort).
    inverse = ops.argsort(order)
    y = ops.reshape(ops.take(y_sorted, inverse, axis=0), (tokens, k, hidden))
    # where, not a product: rows of invalid assignments are never trusted.
    y = ops.where(ops.expand_dims(valid, -1), y, ops.zeros((), y.dtype))
    return ops.einsum("tkd,tk->td", y, ops.cast(expert_weights, y.dtype))
