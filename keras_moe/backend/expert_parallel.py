"""Dropless dispatch across devices: tokens go to their experts' devices (JAX).

`dropless(...)` runs a dropless MoE step under `jax.shard_map` when an
expert-parallel distribution is active. Each device:

1. sorts its own assignments by expert (`sort_by_expert`); the rows for the
   experts of device `j` are then contiguous, in expert order;
2. sends each device the rows of its experts (an all-to-all over the
   expert axis);
3. runs its local experts on what it received, in per-expert blocks
   (`keras_moe.dispatch.blocks`), skipping the blocks no row reached;
4. sends the results back (the reverse all-to-all) and combines them.

No row is ever dropped, so the receive buffers are sized for the worst case:
every device sending all its rows to one device. With `T` local tokens,
`k` choices, `N = T * k` rows of width `d` and `n` devices on the expert axis,
per device and MoE layer:

- `"all_to_all"` (fixed size; every platform, XLA:CPU included): a send
  buffer `(n, N, d)` (the rows for device `j` in slot `j`) and a receive
  buffer `(n, N, d)`, i.e. `2 n N d` values each way, and as many bytes on
  the wire whatever the routing;
- `"ragged_all_to_all"` (`jax.lax.ragged_all_to_all`; GPU/TPU, XLA:CPU in
  jax 0.10 answers UNIMPLEMENTED): the send side is the sorted rows
  themselves (`N d`), the receive buffer `(n N, d)`; only the routed rows
  travel.

Both also hold the received rows in per-expert blocks (`n N + E_local B`
rows). Only the filled blocks are computed, forward and backward; the
backward pass recomputes each filled block instead of keeping activations
of the worst-case size.

Where no expert-parallel distribution is active, or on another backend,
`dropless` returns `None` and the caller runs the single-device
`dispatch_dropless`; the distributed tests check that both give the same
outputs and gradients.
"""

import keras
from keras import ops


def _jax():
    import jax

    return jax


def constrain(tensor, axes, device_mesh):
    """`keras.distribution.distribute_tensor` with a layout that may split
    one dimension over several mesh axes (a tuple of names), which Keras'
    `TensorLayout` does not accept: the JAX sharding is passed directly."""
    jax = _jax()
    spec = jax.sharding.PartitionSpec(*axes)
    sharding = jax.sharding.NamedSharding(device_mesh.backend_mesh, spec)
    return keras.distribution.distribute_tensor(tensor, sharding)


def ragged_supported():
    """Whether XLA implements `ragged_all_to_all` on the default platform."""
    jax = _jax()
    platforms = ("gpu", "tpu", "cuda", "rocm")
    return hasattr(jax.lax, "ragged_all_to_all") and jax.default_backend() in platforms


def choose_exchange(requested):
    """The exchange to use: the requested one, or the best the platform has."""
    if requested is not None:
        return requested
    return "ragged_all_to_all" if ragged_supported() else "all_to_all"


def _exclusive_cumsum(values, axis=0):
    return ops.cumsum(values, axis=axis) - values


# The collective used by the ragged exchange; a module attribute so that the
# tests can check the offsets on XLA:CPU with an emulation built from
# `all_gather` (see tests/distribution).
def _ragged_all_to_all(*args, **kwargs):
    return _jax().lax.ragged_all_to_all(*args, **kwargs)


class _Exchange:
    """Moves rows sorted by destination device to their devices and back.

    `send_sizes[j]` rows start at `send_starts[j]` of the sorted rows for
    device `j`; `counts (n, n)[s, j]` is what device `s` sends device `j`.
    """

    def __init__(self, kind, axis, num_devices, send_starts, send_sizes, counts):
        jax = _jax()
        self.kind, self.axis, self.n = kind, axis, num_devices
        self.send_starts, self.send_sizes = send_starts, send_sizes
        me = jax.lax.axis_index(axis)
        self.recv_sizes = ops.take(counts, me, axis=1)  # (n,) from each source
        # Where each source's rows land on each destination, and where the
        # rows a destination returns land on their source.
        self.output_offsets = ops.take(_exclusive_cumsum(counts, axis=0), me, axis=0)
        self.return_offsets = ops.take(_exclusive_cumsum(counts, axis=1), me, axis=1)

    def receive_starts(self, rows):
        """`(n,)` start of each source's rows in the receive buffer."""
        if self.kind == "all_to_all":
            return ops.arange(self.n, dtype="int32") * rows
        return ops.cast(_exclusive_cumsum(self.recv_sizes), "int32")

    def forward(self, x_sorted):
        """`(N, d)` sorted rows -> `(n * N, d)` received rows."""
        jax = _jax()
        rows, hidden = x_sorted.shape
        if self.kind == "ragged_all_to_all":
            output = ops.zeros((self.n * rows, hidden), x_sorted.dtype)
            return _ragged_all_to_all(
                x_sorted, output, self.send_starts, self.send_sizes, self.output_offsets,
                self.recv_sizes, axis_name=self.axis,
            )
        slot = ops.arange(rows, dtype="int32")
        source = ops.expand_dims(self.send_starts, 1) + slot  # (n, N)
        filled = slot < ops.expand_dims(self.send_sizes, 1)
        table = ops.concatenate([ops.zeros((1, hidden), x_sorted.dtype), x_sorted], axis=0)
        send = ops.take(table, ops.where(filled, source + 1, 0), axis=0)  # (n, N, d)
        received = jax.lax.all_to_all(send, self.axis, 0, 0, tiled=True)  # (n, N, d)
        return ops.reshape(received, (self.n * rows, hidden))

    def backward(self, y_received, row_devices):
        """`(n * N, d)` results in receive order -> `(N, d)` in sorted order."""
        jax = _jax()
        rows = y_received.shape[0] // self.n
        hidden = y_received.shape[1]
        if self.kind == "ragged_all_to_all":
            output = ops.zeros((rows, hidden), y_received.dtype)
            return _ragged_all_to_all(
                y_received, output, self.receive_starts(rows), self.recv_sizes,
                self.return_offsets, self.send_sizes, axis_name=self.axis,
            )
        back = jax.lax.all_to_all(
            ops.reshape(y_received, (self.n, rows, hidden)), self.axis, 0, 0, tiled=True
        )  # back[j, i]: the result of the i-th row sent to device j
        device = ops.minimum(row_devices, self.n - 1)
        offset = ops.arange(rows, dtype="int32") - ops.take(self.send_starts, device)
        index = ops.where(row_devices < self.n, device * rows + offset + 1, 0)
        table = ops.concatenate(
            [ops.zeros((1, hidden), back.dtype), ops.reshape(back, (-1, hidden))], axis=0
        )
        return ops.take(table, index, axis=0)


def _vary(tree, axes):
    """Marks arrays as varying over mesh `axes` (`jax.lax.pcast`).

    Inside `shard_map` JAX would do it where an invariant value (a kernel
    replicated over the batch axis) meets a varying one, and the transpose
    of that cast is a `psum`: inside the expert loop, whose trip count
    differs between devices, some devices would wait in it for others that
    never come. Cast once, before the loop, and the sum happens once,
    outside.
    """
    jax = _jax()

    def cast(x):
        missing = tuple(axis for axis in axes if axis not in jax.typeof(x).mat.varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def _expert_block(experts, training):
    """`block(p, x, key)`: one expert's FFN on a block of rows `(B, d)`.

    `p` holds that expert's slices (`p["up_kernel"] (d, h)`, ...); the
    formula is `feed_forward`'s, with the experts' activation, gating and
    dropout (on the hidden activations, in training).
    """
    from keras_moe.experts.feed_forward import feed_forward

    jax = _jax()
    rate = experts.dropout if training else 0.0

    def block(p, x, key):
        def project(t, name):
            if name == "down" and rate > 0:
                keep = jax.random.uniform(key, t.shape) >= rate
                t = t * ops.cast(keep, t.dtype) / (1.0 - rate)
            y = ops.matmul(t, p[f"{name}_kernel"])
            bias = p.get(f"{name}_bias")
            return y if bias is None else y + bias

        return feed_forward(x, project, experts.activation, experts.gated)

    return block


def _run_filled_blocks(block, params, x_blocks, block_experts, num_filled, keys):
    """`block` on the first `num_filled` blocks; the others give zeros.

    The blocks are sized for the worst case, but only the filled ones are
    computed, forward and backward: a loop with a data-dependent trip count
    (which JAX cannot differentiate by itself) under a custom VJP whose
    backward loop recomputes each filled block's forward and takes its
    vector-Jacobian product. So nothing of the worst-case size is stored for
    the backward pass but the blocks' inputs.
    """
    jax = _jax()

    def expert_params(params, expert):
        return {name: ops.take(value, expert, axis=0) for name, value in params.items()}

    def forward(params, x_blocks, block_experts, num_filled, keys):
        def body(i, y):
            p = expert_params(params, block_experts[i])
            return y.at[i].set(block(p, x_blocks[i], keys[i]))

        return jax.lax.fori_loop(0, num_filled, body, ops.zeros_like(x_blocks))

    def backward(residuals, dy):
        params, x_blocks, block_experts, num_filled, keys = residuals

        def body(i, carry):
            dparams, dx = carry
            expert = block_experts[i]
            _, vjp = jax.vjp(
                lambda p, x: block(p, x, keys[i]), expert_params(params, expert), x_blocks[i]
            )
            dp, dxi = vjp(dy[i])
            dparams = {
                name: dparams[name].at[expert].add(ops.cast(dp[name], "float32")) for name in dparams
            }
            return dparams, dx.at[i].set(dxi)

        # Float32 sums: a bfloat16 kernel gradient adds up many blocks.
        zeros = {name: jax.numpy.zeros_like(value, dtype="float32") for name, value in params.items()}
        dparams, dx = jax.lax.fori_loop(0, num_filled, body, (zeros, ops.zeros_like(x_blocks)))
        dparams = {name: ops.cast(value, params[name].dtype) for name, value in dparams.items()}
        return dparams, dx, None, None, None

    run = jax.custom_vjp(forward)
    run.defvjp(
        lambda *args: (forward(*args), args),
        backward,
    )
    return run(params, x_blocks, block_experts, num_filled, keys)


def _received_experts(exchange, received_counts, rows):
    """The local expert of each received row, `E_local` for empty slots.

    Rows from source `s` start at `receive_starts[s]` and come sorted by
    expert, `received_counts[s, e]` of them for local expert `e`.
    """
    local_experts = received_counts.shape[1]
    starts = exchange.receive_starts(rows)  # (n,)
    position = ops.arange(exchange.n * rows, dtype="int32")
    source = ops.searchsorted(starts, position, side="right") - 1  # (n N,)
    offset = position - ops.take(starts, source)
    ends = ops.take(ops.cumsum(received_counts, axis=1), source, axis=0)  # (n N, E_local)
    is_row = offset < ops.take(exchange.recv_sizes, source)
    local = ops.sum(ops.cast(ends <= ops.expand_dims(offset, 1), "int32"), axis=1)
    return ops.where(is_row, local, local_experts)


def _run_received(received, labels, local_experts, block_size, run_blocks):
    """Local experts on the received rows `(n N, d)`; results in the same order.

    The rows are sorted by local expert into per-expert blocks
    (`keras_moe.dispatch.blocks`), `run_blocks(x_blocks, block_experts,
    num_filled)` computes the filled ones, and the results go back to the
    receive order.
    """
    from keras_moe.dispatch import blocks
    from keras_moe.dispatch.blocks import sort_by_expert

    is_row = labels < local_experts
    order, row_experts, group_sizes = sort_by_expert(
        ops.expand_dims(labels, 1), ops.expand_dims(is_row, 1), local_experts
    )
    x_blocks, block_experts, block_sizes, destinations = blocks.to_blocks(
        ops.take(received, order, axis=0), row_experts, group_sizes, local_experts, block_size
    )
    num_filled = ops.sum(block_sizes) // block_size
    y_blocks = run_blocks(x_blocks, block_experts, num_filled)
    return ops.take(blocks.from_blocks(y_blocks, destinations), ops.argsort(order), axis=0)


def _param_specs(P, expert_axis, model_axis):
    return {
        "up": (P(expert_axis, None, model_axis), P(expert_axis, model_axis)),
        "gate": (P(expert_axis, None, model_axis), P(expert_axis, model_axis)),
        "down": (P(expert_axis, model_axis, None), P(expert_axis, None)),
    }


def dropless(x, expert_indices, expert_weights, valid, experts, training=None):
    """Dropless dispatch with experts split over devices, or `None`.

    Args:
        x: `(tokens, hidden)`.
        expert_indices: `(tokens, k)` int32.
        expert_weights: `(tokens, k)` combine weights.
        valid: `(tokens, k)` bool.
        experts: the layer's experts.
        training: bool.

    Returns:
        `(tokens, hidden)` outputs, or `None` where this path does not apply
        (no expert-parallel distribution, not JAX, experts that are not a
        `StackedExperts`, or a mesh that does not divide them): the caller
        then runs `keras_moe.dispatch.dispatch_dropless`.
    """
    # Imported here: dispatch and experts import this package.
    from keras_moe.dispatch import blocks
    from keras_moe.dispatch.blocks import sort_by_expert
    from keras_moe.distribution import sharding as plan
    from keras_moe.experts.stacked_experts import StackedExperts

    sharding = plan.active()
    if sharding is None or not isinstance(experts, StackedExperts):
        return None
    num_experts = experts.num_experts
    n = sharding.expert_shards
    if num_experts % n or (
        sharding.model_axis is not None
        and experts.intermediate_dim % sharding.axis_size(sharding.model_axis)
    ):
        return None
    jax = _jax()
    P = jax.sharding.PartitionSpec
    exchange = choose_exchange(sharding.exchange)
    expert_axis, model_axis = sharding.expert_axis, sharding.model_axis
    local_experts = num_experts // n

    x = ops.convert_to_tensor(x)
    tokens, hidden = x.shape
    k = expert_indices.shape[1]
    # Every device takes the same number of tokens: pad with invalid rows.
    pad = (-tokens) % sharding.token_shards
    if pad:
        x = ops.pad(x, ((0, pad), (0, 0)))
        expert_indices = ops.pad(expert_indices, ((0, pad), (0, 0)))
        expert_weights = ops.pad(expert_weights, ((0, pad), (0, 0)))
        valid = ops.pad(valid, ((0, pad), (0, 0)))

    # This device's shards of the expert variables, by variable name.
    specs = _param_specs(P, expert_axis, model_axis)
    params, param_specs = {}, {}
    for name in ("up", "gate", "down"):
        for part, spec in zip(("kernel", "bias"), specs[name]):
            variable = getattr(experts, f"{name}_{part}", None)
            if variable is not None:
                params[f"{name}_{part}"] = ops.cast(variable, x.dtype)
                param_specs[f"{name}_{part}"] = spec
    rate = experts.dropout if training else 0.0
    seed = experts.seed_generator.next() if rate > 0 else ops.zeros((2,), "uint32")

    block = _expert_block(experts, training)
    mesh_axes = tuple(sharding.device_mesh.axis_names)

    def body(x, expert_indices, expert_weights, valid, params, seed):
        rows = x.shape[0] * k
        order, row_experts, group_sizes = sort_by_expert(expert_indices, valid, num_experts)
        x_sorted = ops.take(x, order // k, axis=0)  # (N, d), by expert
        per_device = ops.reshape(group_sizes, (n, local_experts))  # (n, E_local)
        send_sizes = ops.sum(per_device, axis=1)  # (n,)
        send_starts = _exclusive_cumsum(send_sizes)
        # Everyone's counts per expert: (n sources, E).
        counts = jax.lax.all_gather(group_sizes, expert_axis)
        me = jax.lax.axis_index(expert_axis)
        received_counts = jax.lax.dynamic_slice_in_dim(
            counts, me * local_experts, local_experts, axis=1
        )  # (n sources, E_local)
        device_counts = ops.sum(ops.reshape(counts, (n, n, local_experts)), axis=2)  # (n, n)
        exchange_ = _Exchange(exchange, expert_axis, n, send_starts, send_sizes, device_counts)
        local_params = params
        if model_axis is not None and "down_bias" in params:
            # Width-split experts sum partial outputs over the model axis
            # afterwards; the down bias must enter that sum once.
            first = ops.cast(jax.lax.axis_index(model_axis) == 0, params["down_bias"].dtype)
            local_params = {**params, "down_bias": params["down_bias"] * first}
        device_seed = jax.random.fold_in(seed, jax.lax.axis_index(sharding.token_axes))

        def run_blocks(x_blocks, block_experts, num_filled):
            keys = jax.random.split(device_seed, x_blocks.shape[0])
            p, x_blocks, keys = _vary((local_params, x_blocks, keys), mesh_axes)
            return _run_filled_blocks(block, p, x_blocks, block_experts, num_filled, keys)

        received = exchange_.forward(x_sorted)  # (n * N, d)
        labels = _received_experts(exchange_, received_counts, rows)  # (n * N,)
        block_size = blocks.block_size_for(rows, local_experts)
        y_received = _run_received(received, labels, local_experts, block_size, run_blocks)
        if model_axis is not None:
            y_received = jax.lax.psum(y_received, model_axis)

        y_sorted = exchange_.backward(y_received, row_experts // local_experts)  # (N, d)
        y = ops.take(y_sorted, ops.argsort(order), axis=0)
        y = ops.reshape(y, (-1, k, hidden))
        y = ops.where(ops.expand_dims(valid, -1), y, ops.zeros((), y.dtype))
        return ops.einsum("tkd,tk->td", y, ops.cast(expert_weights, y.dtype))

    tok = P(sharding.token_axes, None)
    run = jax.shard_map(
        body,
        mesh=sharding.device_mesh.backend_mesh,
        in_specs=(tok, tok, tok, tok, param_specs, P()),
        out_specs=tok,
    )
    outputs = run(x, expert_indices, expert_weights, valid, params, seed)
    return outputs[:tokens] if pad else outputs


def per_group(fn, sharding, num_groups):
    """`fn` on group-major arrays, run by each device on its own groups.

    `fn` takes and returns arrays whose leading axis is the routing group
    (capacity slots, gathers into and out of the buffers). Under
    `jax.shard_map` its flattening tricks (one sort or gather over all
    groups) stay local instead of being partitioned as global operations.
    """
    jax = _jax()
    P = jax.sharding.PartitionSpec
    if num_groups % sharding.token_shards:
        return fn
    spec = P(sharding.token_axes)
    return jax.shard_map(
        fn, mesh=sharding.device_mesh.backend_mesh, in_specs=spec, out_specs=spec
    )
