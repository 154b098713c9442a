"""Capacity-limited dispatch into `(groups, E, C, hidden)` buffers."""

import math

from keras import ops


def compute_capacity(capacity_factor, tokens_per_group, top_k, num_experts):
    """`ceil(cf * tokens_per_group * top_k / num_experts)`, at least 1.

    A Python int when `tokens_per_group` is known while tracing, else an
    int32 tensor (TensorFlow graphs with an unknown batch size).
    """
    if isinstance(tokens_per_group, int):
        return max(1, math.ceil(capacity_factor * tokens_per_group * top_k / num_experts))
    slots = ops.cast(tokens_per_group, "float32") * (capacity_factor * top_k / num_experts)
    return ops.maximum(ops.cast(ops.ceil(slots), "int32"), 1)


def capacity_slots(expert_indices, valid, num_experts, capacity):
    """Buffer slots of each assignment under a per-group capacity.

    Every token's first choice is served before any token's second choice;
    within a choice rank, earlier tokens first. Invalid (masked) assignments
    take no slot.

    Args:
        expert_indices: `(groups, S, k)` int32.
        valid: `(groups, S, k)` bool.
        num_experts: int `E`.
        capacity: int `C`.

    Returns:
        `(slots, dispatched)`: `slots (groups, S, k)` int32 in `[0, E * C]`,
        `e * C + position` for a served assignment and `E * C` (a trash slot)
        for a dropped or invalid one; `dispatched (groups, S, k)` bool.
    """
    # Choice-major order: (groups, k * S), rank j of every token before j + 1.
    by_choice = ops.reshape(ops.transpose(expert_indices, (0, 2, 1)), (ops.shape(expert_indices)[0], -1))
    valid_by_choice = ops.reshape(ops.transpose(valid, (0, 2, 1)), ops.shape(by_choice))
    one_hot = ops.one_hot(by_choice, num_experts, dtype="int32")  # (groups, k*S, E)
    one_hot = one_hot * ops.expand_dims(ops.cast(valid_by_choice, "int32"), -1)
    position = ops.sum(ops.cumsum(one_hot, axis=1) * one_hot, axis=-1) - 1  # (groups, k*S)
    served = ops.logical_and(valid_by_choice, position < capacity)
    slots = ops.where(served, by_choice * capacity + position, num_experts * capacity)
    # Back to token-major (groups, S, k).
    k = ops.shape(expert_indices)[2]
    slots = ops.transpose(ops.reshape(slots, (ops.shape(slots)[0], k, -1)), (0, 2, 1))
    dispatched = ops.transpose(ops.reshape(served, (ops.shape(served)[0], k, -1)), (0, 2, 1))
    return ops.cast(slots, "int32"), dispatched


def _flat_offsets(groups, rows_per_group):
    """`(groups, 1, 1)` offsets of each group's first row in a flat table."""
    return ops.reshape(ops.arange(groups, dtype="int32") * rows_per_group, (-1, 1, 1))


def slot_sources(slots, num_experts, capacity):
    """For each buffer slot, the assignment that fills it.

    Sorting the slots puts the served assignments in slot order; expert
    `e`'s are contiguous and fill its slots `0 .. count_e - 1`, so slot
    `(e, c)` holds sorted entry `start_e + c` when `c < count_e`. Gathers
    only: no scatter (Keras' torch `ops.scatter` loops in Python).

    Args:
        slots: `(groups, A)` int32 slot of each assignment, `E * C` = none.
        num_experts: int `E`.
        capacity: int `C`.

    Returns:
        `(sources (groups, E * C) int32, filled (groups, E * C) bool)`:
        the flat assignment index filling each slot, and whether one does.
    """
    num_assignments = ops.shape(slots)[1]
    # Served slots are unique; only the trash slot ties, and its order is moot.
    order = ops.cast(ops.argsort(slots, axis=-1), "int32")  # (groups, A)
    served = ops.cast(slots < num_experts * capacity, "int32")
    expert = ops.minimum(slots // capacity, num_experts - 1)
    counts = ops.sum(
        ops.one_hot(expert, num_experts, dtype="int32") * ops.expand_dims(served, -1), axis=1
    )  # (groups, E)
    starts = ops.cumsum(counts, axis=-1) - counts
    slot_expert = ops.arange(num_experts * capacity, dtype="int32") // capacity  # (E*C,)
    slot_position = ops.arange(num_experts * capacity, dtype="int32") % capacity
    rank = ops.take(starts, slot_expert, axis=1) + slot_position  # (groups, E*C)
    filled = slot_position < ops.take(counts, slot_expert, axis=1)
    rank = ops.minimum(rank, num_assignments - 1)
    sources = ops.take_along_axis(order, rank, axis=1)
    return sources, filled


def dispatch_with_capacity(x, expert_indices, expert_weights, valid, experts, capacity, training=None):
    """Runs `experts` on capacity buffers and combines the weighted outputs.

    Args:
        x: `(groups, S, hidden)` tokens.
        expert_indices: `(groups, S, k)` int32.
        expert_weights: `(groups, S, k)` combine weights.
        valid: `(groups, S, k)` bool, False for masked tokens.
        experts: a `StackedExperts`.
        capacity: int, slots per expert and group.

    Returns:
        `(outputs (groups, S, hidden), dispatched (groups, S, k) bool)`.
    """
    groups, tokens, hidden = ops.shape(x)
    k = ops.shape(expert_indices)[2]
    num_experts = experts.num_experts
    slots, dispatched = capacity_slots(expert_indices, valid, num_experts, capacity)
    num_slots = num_experts * capacity

    # Which token fills each slot (0 = empty), then one gather of rows: its
    # gradient is the scatter-add the backward pass needs.
    sources, filled = slot_sources(ops.reshape(slots, (groups, -1)), num_experts, capacity)
    slot_tokens = ops.where(filled, sources // k + 1, 0)  # (groups, E*C)
    padded = ops.concatenate([ops.zeros((groups, 1, hidden), x.dtype), x], axis=1)
    table = ops.reshape(padded, (-1, hidden))  # (groups * (S + 1), hidden)
    rows = ops.reshape(slot_tokens + _flat_offsets(groups, tokens + 1)[:, :, 0], (-1,))
    buffer = ops.reshape(ops.take(table, rows, axis=0), (groups, num_experts, capacity, hidden))

    y = experts(buffer, training=training)  # (groups, E, C, hidden)

    # A zero row after each group's slots stands for the trash slot.
    y = ops.concatenate([ops.reshape(y, (groups, num_slots, hidden)), ops.zeros((groups, 1, hidden), y.dtype)], axis=1)
    y_table = ops.reshape(y, (-1, hidden))
    gathered = ops.take(y_table, ops.reshape(slots + _flat_offsets(groups, num_slots + 1), (-1,)), axis=0)
    gathered = ops.reshape(gathered, (groups, tokens, -1, hidden))  # (groups, S, k, hidden)
    weights = ops.cast(expert_weights, gathered.dtype) * ops.cast(dispatched, gathered.dtype)
    outputs = ops.einsum("gskd,gsk->gsd", gathered, weights)
    return outputs, dispatched
