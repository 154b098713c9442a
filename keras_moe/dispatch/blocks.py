"""Per-expert rows: the layout of dropless dispatch, and the two data moves.

The `N = tokens * k` assignments are laid out as `R` rows sorted by expert,
each expert's rows padded to a multiple of the block size `B` (so every
block of `B` rows belongs to one expert). `R = (ceil(N / B) + E - 1) * B`
is static, enough for any routing, so shapes are fixed under `jit`; nothing
of size `(tokens, E)` or `(tokens, k, E)` is made.

A `RowPlan` holds only integer index tables (`R + N` entries), computed once
per call from the routing by one stable sort. The data moves through two
named functions, each the other's transpose:

- `gather_rows(x, plan)`: tokens `(T, d)` -> rows `(R, d)`, straight from
  the tokens (no sorted copy in between); padding rows are zeros.
- `combine_rows(y, plan)`: rows `(R, d)` -> tokens `(T, d)`, each token the
  sum of its `k` rows (a gather, no scatter).

Their gradients are each other (a hand-written backward pass), so the
backward pass moves data with gathers too, never with a scatter-add
(Keras' torch `ops.scatter` is a Python loop, and XLA's CPU scatter is
serial). The fused versions with the expert matmuls, which also avoid
keeping any `(R, d)` tensor for the backward pass, are in
`keras_moe.dispatch.grouped`.
"""

import collections

from keras import ops

from keras_moe import backend as fast

RowPlan = collections.namedtuple(
    "RowPlan",
    [
        "row_tokens",
        "assignment_rows",
        "row_assignments",
        "row_experts",
        "group_sizes",
        "block_experts",
        "block_size",
        "num_experts",
    ],
)
RowPlan.__doc__ = """Where each assignment goes in the per-expert rows (integer tables only).

Attributes:
    row_tokens: `(R,)` int32, the token each row holds; `T` (a zero row
        appended to the tokens) for padding rows.
    assignment_rows: `(T, k)` int32, the row of each assignment; `R` (a zero
        row appended to the rows) for invalid ones.
    row_assignments: `(R,)` int32, the flat assignment `token * k + j` each
        row holds; `N` for padding rows.
    row_experts: `(R,)` int32, the expert of each row (padding rows included:
        the expert of their block).
    group_sizes: `(E,)` int32, the rows each expert spans, multiples of `B`;
        their sum is at most `R`, the rows after it are unused padding.
    block_experts: `(R / B,)` int32, the expert of each block.
    block_size: int `B`.
    num_experts: int `E`.
"""

# Integer tables a custom gradient carries: RowPlan fields that are tensors.
PLAN_TENSORS = RowPlan._fields[:6]


def block_size_for(num_rows, num_experts):
    """A block size: the largest power of two with `E * B <= N / 8`, 16 to 256.

    The static layout has `R - N < E * B` spare rows, so this keeps the
    padding (memory of every `(R, h)` activation, and work) within about
    1/8 of the rows; larger blocks make fewer, larger matmuls. Unknown
    `num_rows` (dynamic shapes) gets 64.
    """
    if not isinstance(num_rows, int):
        return 64
    target = max(1, num_rows // (8 * num_experts))
    size = 16
    while size * 2 <= target and size < 256:
        size *= 2
    return size


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
    # Constants through `fast.scalar_like`: a Python number in an op is a
    # blocking host-to-device copy on Keras' torch backend (see
    # `keras_moe.backend.constants`).
    expert_indices = ops.cast(expert_indices, "int32")
    experts = ops.where(valid, expert_indices, fast.scalar_like(num_experts, expert_indices))
    experts = ops.reshape(experts, (-1,))
    num = ops.shape(experts)[0]
    # Unique keys make the sort stable on every backend (TF's argsort is not).
    keys = experts * num + ops.arange(num, dtype="int32")
    order = ops.cast(ops.argsort(keys), "int32")
    row_experts = ops.take(experts, order)
    group_sizes = fast.count_ids(experts, num_experts, dtype="int32")  # invalid ones: not counted
    return order, row_experts, ops.cast(group_sizes, "int32")


# Sorted rows copied into blocks and back. Expert parallelism
# (`keras_moe.backend.expert_parallel`) uses them for the rows a device
# receives from the others, which arrive as rows, not as local tokens.


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


def plan_rows(expert_indices, valid, num_experts, block_size, portable=False):
    """The `RowPlan` of a routing: one stable sort, then arithmetic.

    Args:
        expert_indices: `(tokens, k)` int32.
        valid: `(tokens, k)` bool, False for assignments not to compute.
        num_experts: int `E`.
        block_size: int `B`, rows per block.
        portable: bool, the `keras.ops` version on every backend (PyTorch
            otherwise builds the same tables with direct operators:
            `keras_moe.backend.plan_tables`).

    Returns:
        A `RowPlan`.

    Examples:
        >>> import numpy as np
        >>> indices = np.array([[1, 0], [1, 2], [0, 1]], "int32")  # 3 tokens, k=2
        >>> valid = np.array([[True, True], [True, True], [True, False]])
        >>> plan = plan_rows(indices, valid, num_experts=3, block_size=2)
        >>> np.asarray(plan.row_tokens).tolist()  # token 3 marks a padding row
        [0, 2, 0, 1, 1, 3, 3, 3, 3, 3]
        >>> np.asarray(plan.group_sizes).tolist()  # rows per expert, whole blocks
        [2, 2, 2]
        >>> np.asarray(plan.assignment_rows).tolist()  # row 10 (= R): none, invalid
        [[2, 0], [3, 4], [1, 10]]
    """
    tables = fast.plan_tables(expert_indices, valid, num_experts, block_size, portable)
    if tables is not None:  # PyTorch: the same tables in a few direct operators
        return RowPlan(*tables, block_size=block_size, num_experts=num_experts)
    tokens, k = ops.shape(expert_indices)[0], ops.shape(expert_indices)[1]
    order, sorted_experts, counts = sort_by_expert(expert_indices, valid, num_experts)
    num = tokens * k
    num_blocks = -(-num // block_size) + num_experts - 1  # enough for any routing
    rows = num_blocks * block_size

    padded = (counts + block_size - 1) // block_size * block_size
    padded_ends = ops.cumsum(padded)
    padded_starts = padded_ends - padded  # (E,)
    starts = ops.cumsum(counts) - counts  # (E,) first sorted index of each expert

    # Row -> sorted assignment, by arithmetic (gathers only, no scatter).
    block_starts = ops.arange(num_blocks, dtype="int32") * block_size
    block_experts = ops.searchsorted(ops.cast(padded_ends, "int32"), block_starts, side="right")
    block_experts = ops.cast(block_experts, "int32")
    block_experts = ops.minimum(block_experts, fast.scalar_like(num_experts - 1, block_experts))
    row_experts = ops.reshape(  # (R,): each block's expert, B times
        ops.broadcast_to(ops.expand_dims(block_experts, -1), (num_blocks, block_size)), (-1,)
    )
    offset = ops.arange(rows, dtype="int32") - ops.take(padded_starts, row_experts)
    filled = offset < ops.take(counts, row_experts)
    sorted_index = ops.take(starts, row_experts) + offset
    sorted_index = ops.minimum(sorted_index, fast.scalar_like(num - 1, sorted_index))
    row_assignments = ops.take(order, sorted_index)
    row_assignments = ops.where(filled, row_assignments, fast.scalar_like(num, row_assignments))
    row_tokens = ops.where(filled, row_assignments // k, fast.scalar_like(tokens, row_assignments))

    # Assignment -> row: each sorted assignment's row, then un-sort (the
    # inverse of a permutation is its argsort).
    expert = ops.minimum(sorted_experts, fast.scalar_like(num_experts - 1, sorted_experts))
    rank = ops.arange(num, dtype="int32") - ops.take(starts, expert)
    sorted_rows = ops.take(padded_starts, expert) + rank
    sorted_rows = ops.where(
        sorted_experts < num_experts, sorted_rows, fast.scalar_like(rows, sorted_rows)
    )
    assignment_rows = ops.take(sorted_rows, ops.argsort(order))
    return RowPlan(
        row_tokens=ops.cast(row_tokens, "int32"),
        assignment_rows=ops.cast(ops.reshape(assignment_rows, (tokens, k)), "int32"),
        row_assignments=ops.cast(row_assignments, "int32"),
        row_experts=row_experts,
        group_sizes=ops.cast(padded, "int32"),
        block_experts=block_experts,
        block_size=block_size,
        num_experts=num_experts,
    )


def plan_tensors(plan):
    """The plan's integer tables, in `PLAN_TENSORS` order."""
    return tuple(getattr(plan, name) for name in PLAN_TENSORS)


def with_tensors(plan, tensors):
    """`plan` with its integer tables replaced (inside a custom gradient)."""
    return plan._replace(**dict(zip(PLAN_TENSORS, tensors)))


def with_zero_row(t):
    """`t (n, d)` and a zero row after it: index `n` reads zeros."""
    return ops.concatenate([t, ops.zeros((1,) + tuple(ops.shape(t)[1:]), t.dtype)], axis=0)


def take_rows(x, plan):
    """`(R, d)` rows of the tokens `x (T, d)`, zeros for padding rows (no custom gradient)."""
    return fast.gather_rows(with_zero_row(x), plan.row_tokens)


def sum_rows(y, plan):
    """`(T, d)`: each token the sum of its `k` rows of `y (R, d)` (no custom gradient)."""
    rows = ops.shape(y)[0]
    k = ops.shape(plan.assignment_rows)[1]
    out = None
    # k gathers of (T, d), not one (T, k, d), and no zero-row copy of the
    # (R, d) rows: invalid assignments select zeros.
    last = fast.scalar_like(rows - 1, plan.assignment_rows)
    zero = fast.scalar_like(0, y)
    for j in range(k):
        index = plan.assignment_rows[:, j]
        term = fast.gather_rows(y, ops.minimum(index, last))
        term = ops.where(ops.expand_dims(index < rows, -1), term, zero)
        out = term if out is None else out + term
    return out


def gather_rows(x, plan, portable=False):
    """Tokens to rows: `(T, d)` -> `(R, d)`, zeros for padding rows.

    Args:
        x: `(T, d)` tokens.
        plan: a `RowPlan`.
        portable: bool, the backend's autodiff (a scatter-add in the
            backward pass) instead of the hand-written gradient.

    Returns:
        `(R, d)` rows; its gradient is `combine_rows` of theirs.

    Examples:
        >>> import numpy as np
        >>> plan = plan_rows(np.array([[1], [0]], "int32"), np.ones((2, 1), bool), 2, 1)
        >>> np.asarray(gather_rows(np.array([[1.0], [2.0]], "float32"), plan))[:, 0].tolist()
        [2.0, 1.0, 0.0]
    """

    def forward(x, *tables):
        return take_rows(x, with_tensors(plan, tables))

    def backward(upstream, x, *tables):
        return (sum_rows(upstream, with_tensors(plan, tables)),)

    return fast.custom_gradient(forward, backward, 1, portable)(x, *plan_tensors(plan))


def combine_rows(y, plan, portable=False):
    """Rows to tokens: `(R, d)` -> `(T, d)`, each token the sum of its rows.

    Invalid assignments read a zero row: they add exactly zero, whatever
    the rows hold.

    Args:
        y: `(R, d)` rows.
        plan: a `RowPlan`.
        portable: bool, the backend's autodiff instead of the hand-written
            gradient.

    Returns:
        `(T, d)`; its gradient is `gather_rows` of theirs.

    Examples:
        >>> import numpy as np
        >>> plan = plan_rows(np.array([[1], [0]], "int32"), np.ones((2, 1), bool), 2, 1)
        >>> rows = np.array([[20.0], [10.0], [99.0]], "float32")  # the last: padding
        >>> np.asarray(combine_rows(rows, plan))[:, 0].tolist()
        [10.0, 20.0]
    """

    def forward(y, *tables):
        return sum_rows(y, with_tensors(plan, tables))

    def backward(upstream, y, *tables):
        return (take_rows(upstream, with_tensors(plan, tables)),)

    return fast.custom_gradient(forward, backward, 1, portable)(y, *plan_tensors(plan))


def row_weights(expert_weights, plan):
    """`(R,)` combine weight of each row, 0 for padding rows."""
    flat = ops.reshape(expert_weights, (-1,))
    return fast.gather_rows(with_zero_row(flat), plan.row_assignments)
