"""Per-expert blocks: the layout of dropless dispatch.

Rows sorted by expert are copied into `(blocks, B, hidden)`, each expert's
rows starting on a block boundary, so that every block holds rows of one
expert only and the experts run as a scan of dense `(B, hidden)` matmuls.
The number of blocks is static, `ceil(N / B) + E` (enough for any routing:
each expert wastes less than one block), so shapes are fixed under `jit`
and no `(E, tokens)` buffer is ever made. The grouped-matmul fast paths use
the same layout with `B = 8`, which keeps every group 16-byte aligned.
"""

from keras import ops


def block_size_for(num_rows, num_experts):
    """A block size: about a quarter of a balanced expert's rows, 32 to 512.

    Smaller blocks waste less padding (at most `E * B` rows); larger ones
    make better matmuls. Unknown `num_rows` (dynamic shapes) gets 128.
    """
    if not isinstance(num_rows, int):
        return 128
    target = max(1, num_rows // (4 * num_experts))
    size = 32
    while size * 2 <= target and size < 512:
        size *= 2
    return size


def to_blocks(x_sorted, row_experts, group_sizes, num_experts, block_size):
    """Copies sorted rows into per-expert blocks.

    Args:
        x_sorted: `(N, hidden)` rows sorted by expert.
        row_experts: `(N,)` int32 expert of each row; `num_experts` marks a
            padding row (sorted last), which is not copied.
        group_sizes: `(E,)` int32 real rows per expert.
        num_experts: int `E`.
        block_size: int `B`.

    Returns:
        `(x_blocks (blocks, B, hidden), block_experts (blocks,) int32,
        block_sizes (E,) int32, destinations (N,) int32)`: `block_sizes[e]`
        is the rows expert `e` spans in the blocks (a multiple of `B`), and
        `destinations[i]` row `i`'s place in the flattened blocks,
        `blocks * B` (out of range) for padding rows.
    """
    rows = ops.shape(x_sorted)[0]
    hidden = ops.shape(x_sorted)[1]
    num_blocks = -(-rows // block_size) + num_experts
    capacity = num_blocks * block_size

    padded_sizes = (group_sizes + block_size - 1) // block_size * block_size
    padded_ends = ops.cumsum(padded_sizes)
    padded_starts = padded_ends - padded_sizes  # (E,)
    starts = ops.cumsum(group_sizes) - group_sizes  # (E,)

    # Sorted row -> block row.
    expert = ops.minimum(row_experts, num_experts - 1)
    rank = ops.arange(rows, dtype="int32") - ops.take(starts, expert)
    destinations = ops.where(
        row_experts < num_experts, ops.take(padded_starts, expert) + rank, capacity
    )
    destinations = ops.cast(destinations, "int32")

    # Block row -> sorted row, by arithmetic: gathers only, no scatter.
    block_starts = ops.arange(num_blocks, dtype="int32") * block_size
    block_experts = ops.searchsorted(ops.cast(padded_ends, "int32"), block_starts, side="right")
    block_experts = ops.cast(ops.minimum(block_experts, num_experts - 1), "int32")
    row_expert = ops.repeat(block_experts, block_size)  # (capacity,)
    offset = ops.arange(capacity, dtype="int32") - ops.take(padded_starts, row_expert)
    filled = ops.logical_and(offset >= 0, offset < ops.take(group_sizes, row_expert))
    source = ops.where(filled, ops.take(starts, row_expert) + offset + 1, 0)
    table = ops.concatenate([ops.zeros((1, hidden), x_sorted.dtype), x_sorted], axis=0)
    x_blocks = ops.reshape(ops.take(table, source, axis=0), (num_blocks, block_size, hidden))
    return x_blocks, block_experts, ops.cast(padded_sizes, "int32"), destinations


def from_blocks(y_blocks, destinations):
    """Rows `(N, hidden)` back from blocks; padding rows come back as zeros."""
    hidden = ops.shape(y_blocks)[-1]
    table = ops.reshape(y_blocks, (-1, hidden))
    table = ops.concatenate([table, ops.zeros((1, hidden), table.dtype)], axis=0)
    return ops.take(table, destinations, axis=0)
