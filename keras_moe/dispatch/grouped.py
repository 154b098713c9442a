"""Expert matmuls over per-expert rows, fused with the data moves.

Two functions carry a dropless expert FFN: the first projection(s) read the
tokens through the rows (`gather_matmul`), and the hidden activation with the
weighted last projection writes the tokens through the rows
(`matmul_combine`). Both have a hand-written backward pass
(`keras_moe.backend.custom_gradient`) that keeps only its inputs and
recomputes the gathers and the hidden activation, so that between the
forward and the backward pass no `(R, d)` copy of the tokens or of the
outputs is kept, and of the `(R, h)` activations only the first projections
(which a dense FFN of width `k * h` keeps too).

Strategies (how `rows @ kernels[expert(row)]` runs; `default_strategy()`
chooses per backend and device):

- `"ranges"`: a Python loop over the experts, each expert's exact row range
  at once (no padding rows; `B = 1`): gathered from the tokens, one dense
  matmul per projection, added back into the tokens in place. For backends
  with dynamic shapes: PyTorch, TensorFlow graphs outside XLA (where
  `StackedExperts` runs its whole FFN per expert in one gradient instead:
  `keras_moe.backend.expert_ffn`).
- `"scan"`: a compiled loop over the experts and, inside, over that expert's
  blocks of `B` rows: one dense `(B, d) @ (d, h)` matmul per block, the
  kernel sliced once per expert, unused blocks skipped, the token rows
  gathered and scatter-added block by block. For XLA: JAX and TensorFlow
  with `jit_compile=True`.
- `"grouped"`: all rows at once through a backend grouped matmul
  (`keras_moe.backend.grouped_matmul`: `jax.lax.ragged_dot` on accelerators,
  `torch._grouped_mm`, per-expert row ranges in TensorFlow graphs), `B = 8`
  (16-byte aligned groups). Makes `(R, d)` transients.
- `"batched"`: all rows at once through one batched einsum over per-block
  copies of the kernels (one kernel launch, more memory; accelerators).

The two loop strategies read and write a block at a time, so neither pass
makes anything of size `(R, d)`.
"""

from keras import ops

from keras_moe import backend as fast
from keras_moe.dispatch import blocks

STRATEGIES = ("ranges", "scan", "grouped", "batched")
LOOPS = ("ranges", "scan")

# How many experts a TensorFlow graph works on at once in the `"ranges"`
# loop. A graph runs independent ops in parallel, so the experts of the
# unrolled loop would all hold their transients at once: each expert's
# reads wait for the results of the expert `IN_FLIGHT` places before it.
# With two in flight the executor's threads overlap one expert's
# single-threaded ops (gathers, scatter-adds, small matmuls) with the next
# one's work: on 2 cores the E = 64, h = 128 gradients took 290 ms instead
# of 356 ms, the E = 8 training step 1.16x the dense FFN's instead of
# 1.26x, at no measurable cost in peak memory.
IN_FLIGHT = 2


# ----------------------------------------------------------------------------
# The expert loop of the "ranges" and "scan" strategies


def _expert_ranges(plan):
    """`(starts, sizes)` of each expert's rows: Python ints on PyTorch (one host read)."""
    starts = ops.cumsum(plan.group_sizes) - plan.group_sizes
    if fast.eager_shapes():
        return fast.host_ints(starts), fast.host_ints(plan.group_sizes)
    return [starts[e] for e in range(plan.num_experts)], [
        plan.group_sizes[e] for e in range(plan.num_experts)
    ]


def _expert_loop(plan, strategy, expert_step, carry):
    """`carry = expert_step(e, blocks, carry)` for every expert `e`.

    `blocks(block_step, state)` runs `state = block_step(start, size, state)`
    over expert `e`'s rows: blocks of `B` rows in a compiled loop (`"scan"`),
    or its whole exact range at once (`"ranges"`).
    """
    if strategy == "scan":
        size = plan.block_size
        per_expert = plan.group_sizes // size
        ends = ops.cumsum(per_expert)
        firsts = ends - per_expert

        def step(e, carry):
            def blocks_of_e(block_step, state):
                return ops.fori_loop(
                    ops.take(firsts, e),
                    ops.take(ends, e),
                    lambda n, state: block_step(n * size, size, state),
                    state,
                )

            return expert_step(e, blocks_of_e, carry)

        return ops.fori_loop(0, plan.num_experts, step, carry)
    starts, sizes = _expert_ranges(plan)
    pieces = _RowPieces(sizes if fast.eager_shapes() else plan.group_sizes)
    finished = []  # per expert, the tensors its results end in
    for e in range(plan.num_experts):

        def blocks_of_e(block_step, state, e=e):
            waits = finished[-IN_FLIGHT] if len(finished) >= IN_FLIGHT else []
            return block_step(_Range(e, starts[e], pieces, waits), sizes[e], state)

        carry = expert_step(e, blocks_of_e, carry)
        finished.append(_latest(carry))
    return _finish(carry)


class _RowPieces:
    """Per-expert pieces of the `(R, ...)` row tensors, split once per loop."""

    def __init__(self, sizes):
        self.sizes, self.cache = sizes, {}

    def __call__(self, t):
        key = id(t)
        if key not in self.cache:  # the tensor is kept too, so its id stays unique
            self.cache[key] = (t, fast.split_rows(t, self.sizes))
        return self.cache[key][1]


class _Range:
    """Expert `e`'s exact rows in the `"ranges"` loop (the `start` of its one block).

    `rows(t)` is the expert's piece of a row tensor, ordered after the
    `waits` (earlier experts' results) in a TensorFlow graph.
    """

    def __init__(self, e, start, pieces, waits):
        self.e, self.start, self.pieces, self.waits = e, start, pieces, waits

    def rows(self, t):
        return fast.after(self.pieces(t)[self.e], self.waits)


def _rows(t, start, size):
    """Rows `start .. start + size` of `t` (any rank), `start` an offset or a `_Range`."""
    if isinstance(start, _Range):
        return start.rows(t)
    shape = ops.shape(t)
    return ops.slice(t, (start,) + (0,) * (len(shape) - 1), (size,) + tuple(shape[1:]))


def _offset(start):
    return start.start if isinstance(start, _Range) else start


def _acc_init(shape, dtype, strategy):
    """A per-expert sum's start: zeros, or nothing for `"ranges"` (one block per expert)."""
    return None if strategy == "ranges" else ops.zeros(shape, dtype)


def _acc_add(acc, value):
    return value if acc is None else acc + value


def _expert_slice(t, e):
    """`t[e]`, sliced once per expert (not per block)."""
    shape = ops.shape(t)
    start = (e,) + (0,) * (len(shape) - 1)
    return ops.reshape(ops.slice(t, start, (1,) + tuple(shape[1:])), shape[1:])


class _Pieces:
    """A buffer written slice after slice in order, concatenated at the end.

    In a TensorFlow graph every functional write copies the whole buffer;
    the `"ranges"` loop writes each expert's rows once, in order, so its
    buffers are lists of pieces there.
    """

    def __init__(self, shape, dtype):
        self.shape, self.dtype, self.parts = shape, dtype, []

    def value(self):
        used = sum(ops.shape(p)[0] for p in self.parts) if self.parts else 0
        tail = ops.zeros((self.shape[0] - used,) + tuple(self.shape[1:]), self.dtype)
        return ops.concatenate(self.parts + [tail], axis=0)


def _buffer(shape, dtype, strategy):
    """A zero buffer the loop writes into (pieces in TensorFlow graphs)."""
    if strategy == "ranges" and not fast.eager_shapes():
        return _Pieces(shape, dtype)
    return ops.zeros(shape, dtype)


def _write(buffer, start, value):
    if isinstance(buffer, _Pieces):
        buffer.parts.append(value)
        return buffer
    return fast.write_slice(buffer, start, value)


def _finish(tree):
    """The loop's results with every `_Pieces` concatenated."""
    if isinstance(tree, (tuple, list)):
        return type(tree)(_finish(t) for t in tree)
    return tree.value() if isinstance(tree, _Pieces) else tree


def _latest(tree):
    """The tensors a later expert's work waits for: the last written piece of each buffer."""
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _latest(item)]
    if isinstance(tree, _Pieces):
        return tree.parts[-1:]
    return [tree]


def _block(source, plan, start, size, gathered, scale=None):
    """Rows `start .. start + size`: of `source` rows, or of tokens gathered into rows.

    Padding rows of gathered blocks are zeros (selected, not multiplied: the
    token read in their place may hold anything). Blocks of size 1 (exact
    row ranges) hold no padding rows.
    """
    if gathered:
        tokens = _rows(plan.row_tokens, start, size)
        if plan.block_size == 1:
            rows = fast.gather_rows(source, tokens)
        else:
            count = ops.shape(source)[0]
            rows = fast.gather_rows(source, ops.minimum(tokens, count - 1))
            rows = ops.where(ops.expand_dims(tokens < count, -1), rows, ops.zeros((), rows.dtype))
    else:
        rows = _rows(source, start, size)
    if scale is not None:
        rows = rows * ops.expand_dims(_rows(scale, start, size), -1)
    return rows


def _add_into_tokens(table, plan, start, size, rows):
    """`table (T, b)` plus the block's rows `(size, b)` at their tokens.

    Within a block all rows belong to one expert, so a token occurs at most
    once; padding rows add an exact zero to the last token.
    """
    tokens = _rows(plan.row_tokens, start, size)
    if plan.block_size > 1:
        count = ops.shape(table)[0]
        rows = ops.where(ops.expand_dims(tokens < count, -1), rows, ops.zeros((), rows.dtype))
        tokens = ops.minimum(tokens, count - 1)
    return fast.add_rows(table, tokens, rows)


def _unique(tensors):
    """`(distinct, index)`: the distinct tensors (by identity) and where each one is."""
    distinct, index = [], []
    for t in tensors:
        found = next((i for i, u in enumerate(distinct) if u is t), None)
        if found is None:
            distinct.append(t)
            found = len(distinct) - 1
        index.append(found)
    return distinct, index


def _loop_matmul(sources, kernels, plan, strategy, transpose, gathered, combined, scale, bias):
    distinct, index = _unique(sources)
    width = ops.shape(kernels[0])[1 if transpose else 2]
    dtype = sources[0].dtype

    def expert_step(e, blocks_of_e, outs):
        expert_kernels = [_expert_slice(k, e) for k in kernels]
        if transpose:
            expert_kernels = [ops.transpose(k) for k in expert_kernels]
        bias_row = None if bias is None else ops.expand_dims(_expert_slice(bias, e), 0)

        def block_step(start, size, outs):
            inputs = [_block(t, plan, start, size, gathered, scale) for t in distinct]
            ys = [ops.matmul(inputs[i], k) for i, k in zip(index, expert_kernels)]
            if bias_row is not None:
                ys[0] = ys[0] + ops.expand_dims(_rows(scale, start, size), -1) * bias_row
            if combined:
                return (_add_into_tokens(outs[0], plan, start, size, sum(ys[1:], ys[0])),)
            return tuple(_write(o, (_offset(start), 0), y) for o, y in zip(outs, ys))

        return blocks_of_e(block_step, outs)

    if combined:
        init = (ops.zeros((ops.shape(plan.assignment_rows)[0], width), dtype),)
        return list(_expert_loop(plan, strategy, expert_step, init))
    # Rows of unused blocks keep their zeros.
    rows = ops.shape(plan.row_experts)[0]
    init = tuple(_buffer((rows, width), dtype, strategy) for _ in kernels)
    return list(_expert_loop(plan, strategy, expert_step, init))


def _loop_outer(
    left, rights, plan, strategy, left_gathered, right_gathered, left_scale, right_scale=None
):
    a = ops.shape(left)[1]

    def expert_step(e, blocks_of_e, outs):
        def block_step(start, size, accs):
            x = ops.transpose(_block(left, plan, start, size, left_gathered, left_scale))
            return tuple(
                _acc_add(
                    acc, ops.matmul(x, _block(r, plan, start, size, right_gathered, right_scale))
                )
                for acc, r in zip(accs, rights)
            )

        init = tuple(_acc_init((a, ops.shape(r)[1]), left.dtype, strategy) for r in rights)
        accs = blocks_of_e(block_step, init)
        return tuple(
            _write(o, (e, 0, 0), ops.expand_dims(acc, 0)) for o, acc in zip(outs, accs)
        )

    init = tuple(
        _buffer((plan.num_experts, a, ops.shape(r)[1]), left.dtype, strategy) for r in rights
    )
    return list(_expert_loop(plan, strategy, expert_step, init))


def _loop_gather_backward(x, upstreams, kernels, plan, strategy):
    """`gather_matmul`'s backward pass as one loop: `(d_x, d_kernels)`.

    Each block reads its token rows and output gradients once for both the
    kernel gradients and the token gradient. One loop also keeps XLA from
    scheduling the optimizer's in-place kernel update before a loop that
    still reads the kernel (which made it copy the kernels).
    """

    def expert_step(e, blocks_of_e, carry):
        expert_kernels = [_expert_slice(k, e) for k in kernels]

        def block_step(start, size, carry):
            d_x, accs = carry
            rows = _block(x, plan, start, size, True)  # (B, d)
            grads = [_block(u, plan, start, size, False) for u in upstreams]  # (B, h)
            accs = tuple(
                _acc_add(acc, ops.matmul(ops.transpose(rows), g)) for acc, g in zip(accs, grads)
            )
            d_rows = sum(ops.matmul(g, ops.transpose(k)) for g, k in zip(grads, expert_kernels))
            return _add_into_tokens(d_x, plan, start, size, d_rows), accs

        d_x, d_kernels = carry
        init = tuple(_acc_init(ops.shape(k)[1:], x.dtype, strategy) for k in kernels)
        d_x, accs = blocks_of_e(block_step, (d_x, init))
        d_kernels = tuple(
            _write(dk, (e, 0, 0), ops.expand_dims(acc, 0)) for dk, acc in zip(d_kernels, accs)
        )
        return d_x, d_kernels

    init = (
        ops.zeros(ops.shape(x), x.dtype),
        tuple(_buffer(ops.shape(k), x.dtype, strategy) for k in kernels),
    )
    d_x, d_kernels = _expert_loop(plan, strategy, expert_step, init)
    return d_x, list(d_kernels)


def _hidden_and_vjp(inputs, activation, mask):
    """The hidden rows from the first projections, and their vjp (or None)."""
    if activation is None:
        hidden, backward = inputs[0], None
    else:
        hidden, backward = fast.vjp(activation, *inputs)
    if mask is not None:
        hidden = hidden * mask
    return hidden, backward


def _input_grads(d_hidden, backward, mask):
    if mask is not None:
        d_hidden = d_hidden * mask
    return (d_hidden,) if backward is None else tuple(backward(d_hidden))


def _loop_combine_backward(upstream, inputs, weights, kernels, bias, plan, strategy, activation, mask):
    """`matmul_combine`'s backward pass as one loop.

    Returns `(d_inputs, d_weights (R,), d_kernels (E, h, d), d_bias (E, d)
    or None)`. Each block recomputes its hidden rows from the first
    projections and reads its rows of the output gradient once (gathered
    from the tokens) for everything, so nothing `(R, d)` is made and the
    only `(R, h)` tensors are the input gradients.
    """
    rows = ops.shape(inputs[0])[0]
    h, d = ops.shape(kernels)[1], ops.shape(kernels)[2]
    dtype = inputs[0].dtype
    has_bias = bias is not None

    def expert_step(e, blocks_of_e, carry):
        kernel = _expert_slice(kernels, e)  # (h, d)
        bias_column = ops.expand_dims(_expert_slice(bias, e), -1) if has_bias else None

        def block_step(start, size, carry):
            d_inputs, d_weights, accs = carry
            block_mask = None if mask is None else _block(mask, plan, start, size, False)
            hidden, backward = _hidden_and_vjp(
                [_block(t, plan, start, size, False) for t in inputs], activation, block_mask
            )  # (B, h)
            g = _block(upstream, plan, start, size, True)  # (B, d)
            w = ops.expand_dims(_rows(weights, start, size), -1)  # (B, 1)
            d_scaled = ops.matmul(g, ops.transpose(kernel))  # (B, h)
            d_w = ops.sum(hidden * d_scaled, axis=-1)
            if has_bias:
                d_w = d_w + ops.matmul(g, bias_column)[:, 0]
            d_block = _input_grads(d_scaled * w, backward, block_mask)
            offset = _offset(start)
            d_inputs = tuple(_write(t, (offset, 0), db) for t, db in zip(d_inputs, d_block))
            d_weights = _write(d_weights, (offset,), d_w)
            new_accs = (_acc_add(accs[0], ops.matmul(ops.transpose(hidden * w), g)),)
            if has_bias:
                new_accs += (_acc_add(accs[1], ops.matmul(ops.transpose(w), g)),)
            return d_inputs, d_weights, new_accs

        d_inputs, d_weights, d_kernels, d_bias = carry
        init = (_acc_init((h, d), dtype, strategy),)
        init += (_acc_init((1, d), dtype, strategy),) if has_bias else ()
        d_inputs, d_weights, accs = blocks_of_e(block_step, (d_inputs, d_weights, init))
        d_kernels = _write(d_kernels, (e, 0, 0), ops.expand_dims(accs[0], 0))
        if has_bias:
            d_bias = _write(d_bias, (e, 0), accs[1])
        return d_inputs, d_weights, d_kernels, d_bias

    init = (
        tuple(_buffer((rows, h), dtype, strategy) for _ in inputs),
        _buffer((rows,), dtype, strategy),
        _buffer(ops.shape(kernels), dtype, strategy),
        _buffer((plan.num_experts, d), dtype, strategy) if has_bias else ops.zeros((1, 1), dtype),
    )
    d_inputs, d_weights, d_kernels, d_bias = _expert_loop(plan, strategy, expert_step, init)
    return list(d_inputs), d_weights, d_kernels, (d_bias if has_bias else None)


# ----------------------------------------------------------------------------
# Matmuls over rows, any strategy


def _as_list(t):
    return list(t) if isinstance(t, (list, tuple)) else [t]


def matmul_rows(
    sources,
    kernels,
    plan,
    strategy,
    transpose=False,
    gathered=False,
    combined=False,
    scale=None,
    bias=None,
):
    """Rows times their expert's kernels, with the data moves fused in.

    Args:
        sources: `(R, a)` rows, or `(T, a)` tokens when `gathered`; or a
            list of them, one per kernel (a tensor listed twice is read once).
        kernels: `(E, a, b)` (`(E, b, a)` when `transpose`), or a list.
        plan: a `RowPlan`.
        strategy: one of `STRATEGIES`.
        transpose: bool, multiply by each kernel's transpose.
        gathered: bool, the sources are tokens, read through
            `plan.row_tokens` (`gather_rows` fused in).
        combined: bool, return tokens `(T, b)`, each the sum of its rows
            over the list (`combine_rows` fused in).
        scale: `(R,)` or `None`, multiplies each source row before the
            matmul.
        bias: `(E, b)` or `None` (one kernel only), added to each row's
            output, times `scale`.

    Returns:
        `(R, b)` rows (padding rows hold zeros or, with `"grouped"`,
        unspecified finite values), a list of them if `kernels` is a list;
        with `combined`, `(T, b)` tokens.
    """
    many = isinstance(kernels, (list, tuple))
    kernels = _as_list(kernels)
    sources = _as_list(sources)
    if len(sources) == 1:
        sources = sources * len(kernels)
    if strategy in LOOPS:
        outs = _loop_matmul(
            sources, kernels, plan, strategy, transpose, gathered, combined, scale, bias
        )
        return outs[0] if combined or not many else outs
    distinct, index = _unique(sources)
    rows = [blocks.take_rows(t, plan) if gathered else t for t in distinct]
    # Scale the narrower side: the `(R, b)` outputs when they are narrower
    # than the `(R, a)` inputs (the last projection when d < h). A row
    # scale is a broadcasting multiply, which GPUs run as an unvectorized
    # kernel: on an H200 one `(R, h)` scale took 0.57 ms at the Mixtral shape.
    width_in = ops.shape(rows[0])[1]
    width_out = ops.shape(kernels[0])[1 if transpose else 2]
    scale_outputs = scale is not None and _narrower(width_out, width_in)
    if scale is not None and not scale_outputs:
        rows = [r * ops.expand_dims(scale, -1) for r in rows]
    ys = []
    for i, k in zip(index, kernels):
        if transpose:
            k = ops.transpose(k, (0, 2, 1))
        if strategy == "grouped":
            ys.append(fast.grouped_matmul(rows[i], k, plan.group_sizes))
        else:  # "batched": one einsum over per-block copies of the kernels.
            x = ops.reshape(rows[i], (-1, plan.block_size, ops.shape(rows[i])[1]))  # (blocks, B, a)
            y = ops.einsum("nba,nac->nbc", x, ops.take(k, plan.block_experts, axis=0))
            ys.append(ops.reshape(y, (-1, ops.shape(y)[2])))
    if scale_outputs:
        if bias is not None:
            ys[0] = ys[0] + ops.take(bias, plan.row_experts, axis=0)
        ys = [y * ops.expand_dims(scale, -1) for y in ys]
    elif bias is not None:
        ys[0] = ys[0] + ops.expand_dims(scale, -1) * ops.take(bias, plan.row_experts, axis=0)
    if combined:
        return blocks.sum_rows(sum(ys[1:], ys[0]), plan)
    return ys if many else ys[0]


def _narrower(a, b):
    """Whether width `a` is known to be smaller than width `b` (static widths only)."""
    return isinstance(a, int) and isinstance(b, int) and a < b


def outer_rows(
    left,
    rights,
    plan,
    strategy,
    left_gathered=False,
    right_gathered=False,
    left_scale=None,
    right_scale=None,
):
    """Per expert, the sum over its rows of `left[r]^T right[r]`: `(E, a, b)`.

    The gradient of a grouped matmul's kernels. Padding rows must hold
    zeros in at least one of the operands.

    Args:
        left: `(R, a)` rows, or `(T, a)` tokens when `left_gathered`.
        rights: `(R, b)` rows, or `(T, b)` tokens when `right_gathered`; or
            a list of them (one result each, `left` read once).
        plan: a `RowPlan`.
        strategy: one of `STRATEGIES`.
        left_gathered: bool, `left` are tokens read through the rows.
        right_gathered: bool, `rights` are tokens read through the rows.
        left_scale: `(R,)` or `None`, multiplies each row of `left`.
        right_scale: `(R,)` or `None`, multiplies each row of the `rights`
            (the same result as scaling `left`; scale the narrower side).

    Returns:
        `(E, a, b)`, or a list of them if `rights` is a list.
    """
    many = isinstance(rights, (list, tuple))
    rights = _as_list(rights)
    if strategy in LOOPS:
        outs = _loop_outer(
            left, rights, plan, strategy, left_gathered, right_gathered, left_scale, right_scale
        )
        return outs if many else outs[0]
    left = blocks.take_rows(left, plan) if left_gathered else left
    if left_scale is not None:
        left = left * ops.expand_dims(left_scale, -1)
    outs = []
    for right in rights:
        right = blocks.take_rows(right, plan) if right_gathered else right
        if right_scale is not None:
            right = right * ops.expand_dims(right_scale, -1)
        if strategy == "grouped":
            outs.append(fast.grouped_outer(left, right, plan.group_sizes))
            continue
        size = plan.block_size
        x = ops.reshape(left, (-1, size, ops.shape(left)[1]))
        g = ops.reshape(right, (-1, size, ops.shape(right)[1]))
        per_block = ops.einsum("nba,nbc->nac", x, g)  # (blocks, a, b)
        outs.append(fast.segment_sum(per_block, plan.block_experts, plan.num_experts))
    return outs if many else outs[0]


# ----------------------------------------------------------------------------
# The two fused functions of a dropless expert FFN


def gather_matmul(x, kernels, plan, strategy, portable=False):
    """Tokens into their experts' first projection(s): `(T, d)` -> `(R, h)`.

    `out[r] = x[row_tokens[r]] @ kernels[expert(r)]`, for each kernel of a
    list (the rows gathered once: SwiGLU's gate and up projections). The
    backward pass keeps `x` and the kernels only and gathers the rows again.

    Args:
        x: `(T, d)` tokens.
        kernels: `(E, d, h)`, or a list of them.
        plan: a `RowPlan`.
        strategy: one of `STRATEGIES`.
        portable: bool, the backend's autodiff instead of the hand-written
            backward pass (for tests).

    Returns:
        `(R, h)` rows, or a list of them if `kernels` is a list.
    """
    many = isinstance(kernels, (list, tuple))
    kernels = _as_list(kernels)
    count = len(kernels)

    def forward(x, *rest):
        kernels, tables = list(rest[:count]), rest[count:]
        p = blocks.with_tensors(plan, tables)
        return tuple(_as_list(matmul_rows(x, kernels, p, strategy, gathered=True)))

    def backward(upstream, x, *rest):
        kernels, tables = list(rest[:count]), rest[count:]
        p = blocks.with_tensors(plan, tables)
        upstream = list(upstream)
        if strategy in LOOPS:
            d_x, d_kernels = _loop_gather_backward(x, upstream, kernels, p, strategy)
        else:
            d_kernels = outer_rows(x, upstream, p, strategy, left_gathered=True)
            d_x = matmul_rows(upstream, kernels, p, strategy, transpose=True, combined=True)
        return (d_x, *d_kernels)

    fn = fast.custom_gradient(forward, backward, 1 + count, portable)
    outs = fn(x, *kernels, *blocks.plan_tensors(plan))
    return list(outs) if many else outs[0]


def matmul_combine(
    inputs, weights, kernels, bias, plan, strategy, activation=None, mask=None, portable=False
):
    """The hidden activation and the weighted last projection, into the tokens.

    `hidden = activation(*inputs) * mask` (`(R, h)` rows), then
    `out[t] = sum_j w_tj * (hidden[r_tj] @ kernels[e_tj] + bias[e_tj])` over
    the rows `r_tj` of token `t`'s assignments: `(T, d)`. The weights scale
    the rows before the matmul, and the backward pass recomputes the hidden
    rows from `inputs` (the first projections, which it keeps), so it keeps
    neither the hidden rows, nor the `(R, d)` outputs, nor (beyond a
    transient) their gradient.

    Args:
        inputs: `(R, h)` rows, or a list of them (the first projections:
            `[up]` or `[up, gate]`).
        weights: `(R,)` combine weight of each row (0 for padding rows).
        kernels: `(E, h, d)`.
        bias: `(E, d)` or `None`.
        plan: a `RowPlan`.
        strategy: one of `STRATEGIES`.
        activation: `None` (`inputs` is the hidden rows) or an elementwise
            function of the `inputs` giving the hidden rows (its gradient
            comes from `keras_moe.backend.vjp`).
        mask: `(R, h)` or `None`, multiplies the hidden rows (dropout).
        portable: bool, the backend's autodiff instead of the hand-written
            backward pass (for tests).

    Returns:
        `(T, d)` tokens.
    """
    inputs = _as_list(inputs)
    count = len(inputs)
    has_bias = bias is not None
    has_mask = mask is not None
    mask = None if mask is None else ops.convert_to_tensor(mask)

    def unpack(rest):
        rest = list(rest)
        bias = rest.pop(0) if has_bias else None
        mask = rest.pop(0) if has_mask else None
        return bias, mask, blocks.with_tensors(plan, rest)

    def forward(*args):
        inputs, (weights, kernels) = list(args[:count]), args[count : count + 2]
        bias, mask, p = unpack(args[count + 2 :])
        hidden = inputs[0] if activation is None else activation(*inputs)
        if mask is not None:
            hidden = hidden * mask
        return matmul_rows(hidden, kernels, p, strategy, combined=True, scale=weights, bias=bias)

    def backward(upstream, *args):
        inputs, (weights, kernels) = list(args[:count]), args[count : count + 2]
        bias, mask, p = unpack(args[count + 2 :])
        if strategy in LOOPS:
            d_inputs, d_weights, d_kernels, d_bias = _loop_combine_backward(
                upstream, inputs, weights, kernels, bias, p, strategy, activation, mask
            )
        else:
            hidden, vjp_fn = _hidden_and_vjp(inputs, activation, mask)
            d_scaled = matmul_rows(upstream, kernels, p, strategy, transpose=True, gathered=True)
            # The kernel gradient sums (w * hidden)^T g = hidden^T (w * g):
            # the weights scale the narrower of the two.
            h, d = ops.shape(kernels)[1], ops.shape(kernels)[2]
            side = "right_scale" if _narrower(d, h) else "left_scale"
            d_kernels = outer_rows(
                hidden, upstream, p, strategy, right_gathered=True, **{side: weights}
            )
            d_weights = ops.sum(hidden * d_scaled, axis=-1)  # (R,)
            d_inputs = _input_grads(d_scaled * ops.expand_dims(weights, -1), vjp_fn, mask)
            d_bias = None
            if has_bias:
                # The bias term w * bias[e] is a 1-wide projection of the weights.
                column = ops.expand_dims(bias, -1)  # (E, d, 1)
                d_weights_bias = matmul_rows(upstream, column, p, strategy, gathered=True)
                d_weights = d_weights + d_weights_bias[:, 0]
                ones = ops.expand_dims(ops.ones_like(weights), -1)  # (R, 1)
                d_bias = outer_rows(
                    ones, upstream, p, strategy, right_gathered=True, left_scale=weights
                )[:, 0, :]
        grads = (*d_inputs, d_weights, d_kernels)
        return grads + ((d_bias,) if has_bias else ())

    args = (*inputs, weights, kernels) + ((bias,) if has_bias else ())
    extra = (mask,) if has_mask else ()
    fn = fast.custom_gradient(forward, backward, len(args), portable)
    return fn(*args, *extra, *blocks.plan_tensors(plan))
