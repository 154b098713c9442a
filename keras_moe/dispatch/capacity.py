"""Capacity-limited dispatch into `(groups, E, C, hidden)` buffers.

Three steps, each a named function so that routers which choose their own
slots (Expert Choice) reuse the same data movement:

1. `capacity_slots`: the slot of every assignment under the capacity rule
   (or the router's own slots).
2. `gather_slots`: tokens into the `(groups, E, C, hidden)` buffer.
3. `combine_slots`: expert outputs back to tokens, weighted.

Data moves by gathers only: Keras' torch `ops.scatter` loops in Python, and a
gather's gradient is the scatter-add the backward pass needs anyway. No
`(assignments, E)` one-hot table is made: positions come from one sort.
"""

import math

from keras import ops

from keras_moe.distribution import sharding as distribution


def compute_capacity(capacity_factor, tokens_per_group, top_k, num_experts):
    """`ceil(cf * tokens_per_group * top_k / num_experts)`, at least 1.

    A Python int when `tokens_per_group` is known while tracing, else an
    int32 tensor (TensorFlow graphs with an unknown batch size).
    """
    if isinstance(tokens_per_group, int):
        return max(1, math.ceil(capacity_factor * tokens_per_group * top_k / num_experts))
    slots = ops.cast(tokens_per_group, "float32") * (capacity_factor * top_k / num_experts)
    return ops.maximum(ops.cast(ops.ceil(slots), "int32"), 1)


def _group_offsets(groups, stride):
    """`(groups, 1)` int32 offsets that keep per-group values apart in 1-D."""
    return ops.reshape(ops.arange(groups, dtype="int32") * stride, (-1, 1))


def _batched_searchsorted(sorted_rows, values, stride):
    """`searchsorted` (left) of `values (G, V)` in each row of `sorted_rows (G, A)`.

    Both hold integers in `[0, stride)`; shifting group `g` by `g * stride`
    makes one 1-D sorted sequence (Keras' `searchsorted` is 1-D only).
    Returns `(G, V)` int32 positions within each row.
    """
    groups, width = ops.shape(sorted_rows)[0], ops.shape(sorted_rows)[1]
    offsets = _group_offsets(groups, stride)
    flat = ops.reshape(sorted_rows + offsets, (-1,))
    positions = ops.searchsorted(flat, ops.reshape(values + offsets, (-1,)), side="left")
    positions = ops.reshape(ops.cast(positions, "int32"), ops.shape(values))
    return positions - _group_offsets(groups, width)


def capacity_slots(expert_indices, valid, num_experts, capacity, priority=None):
    """Buffer slots of each assignment under a per-group capacity.

    Every token's first choice is served before any token's second choice.
    Within a choice rank, tokens are served in order of decreasing
    `priority` (ties, and `priority=None`, in token order). Invalid
    (masked) assignments take no slot.

    Args:
        expert_indices: `(groups, S, k)` int32.
        valid: `(groups, S, k)` bool.
        num_experts: int `E`.
        capacity: int `C`.
        priority: optional `(groups, S)` float, higher first.

    Returns:
        `(slots, dispatched)`: `slots (groups, S, k)` int32 in `[0, E * C]`,
        `e * C + position` for a served assignment and `E * C` (a trash slot)
        for a dropped or invalid one; `dispatched (groups, S, k)` bool.
    """
    groups, tokens, k = (ops.shape(expert_indices)[i] for i in range(3))
    experts = ops.where(valid, expert_indices, num_experts)  # invalid sort last
    experts = ops.transpose(ops.cast(experts, "int32"), (0, 2, 1))  # (groups, k, S)
    if priority is not None:
        priority = ops.where(ops.isfinite(priority), priority, float("-inf"))
        token_order = ops.cast(ops.argsort(-priority, axis=-1), "int32")  # (groups, S)
        experts = ops.take_along_axis(experts, ops.expand_dims(token_order, 1), axis=2)
    # Choice-major order: (groups, A), rank j of every token before rank j + 1.
    by_choice = ops.reshape(experts, (groups, -1))
    num_assignments = ops.shape(by_choice)[1]
    position = ops.arange(num_assignments, dtype="int32")
    # Unique keys: a stable sort by expert on every backend.
    order = ops.cast(ops.argsort(by_choice * num_assignments + position, axis=-1), "int32")
    sorted_experts = ops.take_along_axis(by_choice, order, axis=1)  # (groups, A)
    starts = _batched_searchsorted(
        sorted_experts,
        ops.broadcast_to(ops.arange(num_experts + 1, dtype="int32"), (groups, num_experts + 1)),
        num_experts + 1,
    )  # (groups, E + 1): first sorted entry of each expert
    rank = position - ops.take_along_axis(starts, sorted_experts, axis=1)
    served = ops.logical_and(sorted_experts < num_experts, rank < capacity)
    sorted_slots = ops.where(served, sorted_experts * capacity + rank, num_experts * capacity)
    # Unsort (the inverse of a permutation is its argsort), then undo the
    # priority order and go back to token-major (groups, S, k).
    slots = ops.take_along_axis(sorted_slots, ops.argsort(order, axis=-1), axis=1)
    slots = ops.reshape(slots, (groups, k, tokens))
    if priority is not None:
        slots = ops.take_along_axis(
            slots, ops.expand_dims(ops.argsort(token_order, axis=-1), 1), axis=2
        )
    slots = ops.cast(ops.transpose(slots, (0, 2, 1)), "int32")
    return slots, slots < num_experts * capacity


def slot_sources(slots, num_experts, capacity):
    """For each buffer slot, the assignment that fills it.

    Served slots are unique, so after sorting the assignments by slot, slot
    `s` is filled by the sorted entry found where `s` would be inserted, if
    that entry holds `s`.

    Args:
        slots: `(groups, A)` int32 slot of each assignment, `E * C` = none.
        num_experts: int `E`.
        capacity: int `C`.

    Returns:
        `(sources (groups, E * C) int32, filled (groups, E * C) bool)`:
        the flat assignment index filling each slot, and whether one does.
    """
    groups, num_assignments = ops.shape(slots)[0], ops.shape(slots)[1]
    num_slots = num_experts * capacity
    order = ops.cast(ops.argsort(slots, axis=-1), "int32")  # (groups, A)
    sorted_slots = ops.take_along_axis(slots, order, axis=1)
    wanted = ops.broadcast_to(ops.arange(num_slots, dtype="int32"), (groups, num_slots))
    found = _batched_searchsorted(sorted_slots, wanted, num_slots + 1)
    found = ops.minimum(found, num_assignments - 1)
    filled = ops.take_along_axis(sorted_slots, found, axis=1) == wanted
    return ops.take_along_axis(order, found, axis=1), filled


def gather_slots(x, slots, num_experts, capacity):
    """Tokens into capacity buffers: `(groups, S, hidden)` -> `(groups, E, C, hidden)`.

    Args:
        x: `(groups, S, hidden)` tokens.
        slots: `(groups, S, k)` int32 slot of each assignment (`E * C`: none).
        num_experts: int `E`.
        capacity: int `C`.

    Returns:
        The buffer `(groups, E, C, hidden)`; empty slots hold zeros.
    """
    groups, tokens, hidden = ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[2]
    k = ops.shape(slots)[2]
    sources, filled = slot_sources(ops.reshape(slots, (groups, -1)), num_experts, capacity)
    slot_tokens = ops.where(filled, sources // k + 1, 0)  # (groups, E*C), 0 = empty
    # A zero row before each group's tokens stands for the empty slot; one
    # gather of rows, whose gradient is the scatter-add the backward needs.
    padded = ops.concatenate([ops.zeros((groups, 1, hidden), x.dtype), x], axis=1)
    table = ops.reshape(padded, (-1, hidden))  # (groups * (S + 1), hidden)
    rows = ops.reshape(slot_tokens + _group_offsets(groups, tokens + 1), (-1,))
    return ops.reshape(ops.take(table, rows, axis=0), (groups, num_experts, capacity, hidden))


def combine_slots(y, slots, expert_weights, dispatched):
    """Expert outputs back to tokens: `sum_j w_j * y[slot_j]` over dispatched `j`.

    Args:
        y: `(groups, E, C, hidden)` expert outputs.
        slots: `(groups, S, k)` int32 (`E * C`: none).
        expert_weights: `(groups, S, k)` combine weights.
        dispatched: `(groups, S, k)` bool.

    Returns:
        `(groups, S, hidden)`.
    """
    groups, num_experts, capacity, hidden = (ops.shape(y)[i] for i in range(4))
    tokens = ops.shape(slots)[1]
    num_slots = num_experts * capacity
    # A zero row after each group's slots stands for the trash slot.
    y = ops.concatenate(
        [ops.reshape(y, (groups, num_slots, hidden)), ops.zeros((groups, 1, hidden), y.dtype)], axis=1
    )
    rows = ops.reshape(slots + ops.expand_dims(_group_offsets(groups, num_slots + 1), -1), (-1,))
    gathered = ops.take(ops.reshape(y, (-1, hidden)), rows, axis=0)
    gathered = ops.reshape(gathered, (groups, tokens, -1, hidden))  # (groups, S, k, hidden)
    weights = ops.where(dispatched, ops.cast(expert_weights, gathered.dtype), ops.zeros((), gathered.dtype))
    return ops.einsum("gskd,gsk->gsd", gathered, weights)


def dispatch_to_slots(x, slots, expert_weights, dispatched, experts, capacity, training=None):
    """Runs `experts` on the buffers of given slots and combines.

    Args:
        x: `(groups, S, hidden)` tokens.
        slots: `(groups, S, k)` int32 slot of each assignment (`E * C`: none).
        expert_weights: `(groups, S, k)` combine weights.
        dispatched: `(groups, S, k)` bool, the assignments that hold a slot.
        experts: a stacked-experts layer.
        capacity: int, slots per expert and group.

    Returns:
        `outputs (groups, S, hidden)`.
    """
    num_experts, groups = experts.num_experts, ops.shape(x)[0]
    # Under expert parallelism each device fills the buffers of its own
    # groups, the buffers move to their experts' devices and back (two
    # all-to-alls), and each device combines its groups; without it these
    # wrappers and constraints are no-ops.
    gather = distribution.per_group(lambda x, s: gather_slots(x, s, num_experts, capacity), groups)
    buffer = distribution.shard_experts(gather(x, slots))
    y = distribution.shard_experts(experts(buffer, training=training))  # (groups, E, C, hidden)
    combine = distribution.per_group(combine_slots, groups)
    return combine(distribution.shard_groups(y), slots, expert_weights, dispatched)


def dispatch_with_capacity(
    x, expert_indices, expert_weights, valid, experts, capacity, training=None, priority=None
):
    """Runs `experts` on capacity buffers and combines the weighted outputs.

    Args:
        x: `(groups, S, hidden)` tokens.
        expert_indices: `(groups, S, k)` int32.
        expert_weights: `(groups, S, k)` combine weights.
        valid: `(groups, S, k)` bool, False for assignments not to route.
        experts: a stacked-experts layer.
        capacity: int, slots per expert and group.
        priority: optional `(groups, S)` service order within a choice rank
            (higher first); see `capacity_slots`.

    Returns:
        `(outputs (groups, S, hidden), dispatched (groups, S, k) bool)`.
    """
    def slots_of(expert_indices, valid, *priority):
        return capacity_slots(
            expert_indices, valid, experts.num_experts, capacity, priority=(priority or (None,))[0]
        )

    extra = () if priority is None else (priority,)
    groups = ops.shape(expert_indices)[0]
    slots, dispatched = distribution.per_group(slots_of, groups)(expert_indices, valid, *extra)
    outputs = dispatch_to_slots(x, slots, expert_weights, dispatched, experts, capacity, training)
    return outputs, dispatched
