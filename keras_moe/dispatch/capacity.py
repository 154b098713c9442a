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
    num_experts = experts.num_experts
    slots, dispatched = capacity_slots(expert_indices, valid, num_experts, capacity)
    num_slots = num_experts * capacity

    # Which token fills each slot (0 = empty): a gather is cheaper than
    # scattering hidden vectors, and its gradient is the scatter-add we need.
    token_ids = ops.broadcast_to(
        ops.reshape(ops.arange(1, tokens + 1, dtype="int32"), (1, -1, 1)), ops.shape(slots)
    )
    group_ids = ops.broadcast_to(ops.reshape(ops.arange(groups, dtype="int32"), (-1, 1, 1)), ops.shape(slots))
    scatter_at = ops.stack([ops.reshape(group_ids, (-1,)), ops.reshape(slots, (-1,))], axis=-1)
    # Dropped assignments all land in the trash slot, which is cut off.
    slot_tokens = ops.scatter(scatter_at, ops.reshape(token_ids, (-1,)), (groups, num_slots + 1))
    slot_tokens = slot_tokens[:, :num_slots]

    # (groups * (S + 1), hidden) with a zero row in front of each group.
    padded = ops.concatenate([ops.zeros((groups, 1, hidden), x.dtype), x], axis=1)
    table = ops.reshape(padded, (-1, hidden))
    rows = ops.reshape(slot_tokens + _flat_offsets(groups, tokens + 1)[:, :, 0], (-1,))
    buffer = ops.reshape(ops.take(table, rows, axis=0), (groups, num_experts, capacity, hidden))

    y = experts(buffer, training=training)  # (groups, E, C, hidden)

    y = ops.concatenate([ops.reshape(y, (groups, num_slots, hidden)), ops.zeros((groups, 1, hidden), y.dtype)], axis=1)
    y_table = ops.reshape(y, (-1, hidden))
    gathered = ops.take(y_table, ops.reshape(slots + _flat_offsets(groups, num_slots + 1), (-1,)), axis=0)
    gathered = ops.reshape(gathered, (groups, tokens, -1, hidden))  # (groups, S, k, hidden)
    weights = ops.cast(expert_weights, gathered.dtype) * ops.cast(dispatched, gathered.dtype)
    outputs = ops.einsum("gskd,gsk->gsd", gathered, weights)
    return outputs, dispatched
