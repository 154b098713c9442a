"""Expert matmuls over per-expert rows, fused with the data moves.

Two functions carry a dropless expert FFN: the first projection(s) read the
tokens through the rows (`gather_matmul`), the last projection writes the
tokens through the rows (`matmul_combine`). Both have a hand-written
backward pass (`keras_moe.backend.custom_gradient`) that keeps only its
inputs and recomputes the gathers, so no `(R, d)` copy of the tokens, of
the outputs or of their gradients is kept between the forward and the
backward pass; what stays are the `(R, h)` hidden activations, which a
dense FFN of width `k * h` keeps too.

Strategies (how `rows @ kernels[expert(row)]` runs; `default_strategy()`
chooses per backend and device):

- `"grouped"`: a backend grouped matmul over all rows
  (`keras_moe.backend.grouped_matmul`; `torch._grouped_mm`, per-expert row
  ranges in TensorFlow graphs, `jax.lax.ragged_dot` on accelerators), with
  `B = 8` (16-byte aligned groups).
- `"scan"`: a loop over experts and, inside, over that expert's blocks: one
  dense `(B, d) @ (d, h)` matmul per block, the kernel sliced once per
  expert, unused blocks skipped, and the token rows gathered block by block
  (nothing of size `(R, d)` is made for the first projection). Portable
  (`ops.fori_loop`); for JAX and TensorFlow under XLA.
- `"batched"`: one batched einsum over per-block copies of the kernels (one
  kernel launch, more memory; accelerators).
"""

from keras import ops

from keras_moe import backend as fast
from keras_moe.dispatch import blocks

STRATEGIES = ("grouped", "scan", "batched")


def _block_ranges(plan):
    """`(first_block (E,), end_block (E,))` of each expert's blocks."""
    per_expert = plan.group_sizes // plan.block_size
    ends = ops.cumsum(per_expert)
    return ends - per_expert, ends


def _expert_slice(t, e):
    """`t[e]` by a dynamic slice (one copy per expert, not per block)."""
    shape = ops.shape(t)
    start = (e,) + (0,) * (len(shape) - 1)
    return ops.reshape(ops.slice(t, start, (1,) + tuple(shape[1:])), shape[1:])


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


def _block(source, plan, start, gathered, scale=None):
    """Block rows `start .. start + B`: of `source` rows, or of tokens gathered into rows.

    Padding rows of gathered blocks are zeros (selected, not multiplied: the
    token read in their place may hold anything).
    """
    size = plan.block_size
    if gathered:
        tokens = ops.slice(plan.row_tokens, (start,), (size,))
        count = ops.shape(source)[0]
        rows = ops.take(source, ops.minimum(tokens, count - 1), axis=0)
        rows = ops.where(ops.expand_dims(tokens < count, -1), rows, ops.zeros((), rows.dtype))
    else:
        rows = ops.slice(source, (start, 0), (size, ops.shape(source)[1]))
    if scale is not None:
        rows = rows * ops.expand_dims(ops.slice(scale, (start,), (size,)), -1)
    return rows


def _add_into_tokens(table, plan, start, rows):
    """`table (T, b)` plus block rows `(B, b)` at their tokens (padding rows: nothing).

    Within a block all rows belong to one expert, so a token occurs at most
    once and the scatter-add has no duplicates but the padding rows, which
    add an exact zero to the last token.
    """
    size = plan.block_size
    tokens = ops.slice(plan.row_tokens, (start,), (size,))
    count = ops.shape(table)[0]
    rows = ops.where(ops.expand_dims(tokens < count, -1), rows, ops.zeros((), rows.dtype))
    index = ops.expand_dims(ops.minimum(tokens, count - 1), -1)
    return ops.scatter_update(table, index, rows, reduction="add")


def _scan_matmul(sources, kernels, plan, transpose, gathered, combined, scale, bias):
    first, end = _block_ranges(plan)
    distinct, index = _unique(sources)
    width = ops.shape(kernels[0])[1 if transpose else 2]
    size = plan.block_size
    dtype = sources[0].dtype

    def expert_step(e, outs):
        expert_kernels = [_expert_slice(k, e) for k in kernels]
        if transpose:
            expert_kernels = [ops.transpose(k) for k in expert_kernels]
        bias_row = None if bias is None else ops.expand_dims(_expert_slice(bias, e), 0)

        def block_step(n, outs):
            start = n * size
            inputs = [_block(t, plan, start, gathered, scale) for t in distinct]
            ys = [ops.matmul(inputs[i], k) for i, k in zip(index, expert_kernels)]  # (B, width)
            if bias_row is not None:
                ys[0] = ys[0] + ops.expand_dims(ops.slice(scale, (start,), (size,)), -1) * bias_row
            if combined:
                return (_add_into_tokens(outs[0], plan, start, sum(ys[1:], ys[0])),)
            return tuple(ops.slice_update(o, (start, 0), y) for o, y in zip(outs, ys))

        return ops.fori_loop(ops.take(first, e), ops.take(end, e), block_step, outs)

    if combined:
        init = (ops.zeros((ops.shape(plan.assignment_rows)[0], width), dtype),)
        return [ops.fori_loop(0, plan.num_experts, expert_step, init)[0]]
    # Rows of unused blocks keep their zeros.
    rows = ops.shape(plan.row_experts)[0]
    init = tuple(ops.zeros((rows, width), dtype) for _ in kernels)
    return list(ops.fori_loop(0, plan.num_experts, expert_step, init))


def _scan_outer(left, rights, plan, left_gathered, right_gathered, left_scale):
    first, end = _block_ranges(plan)
    a = ops.shape(left)[1]

    def expert_step(e, outs):
        def block_step(n, accs):
            start = n * plan.block_size
            x = ops.transpose(_block(left, plan, start, left_gathered, left_scale))
            return tuple(
                acc + ops.matmul(x, _block(r, plan, start, right_gathered))
                for acc, r in zip(accs, rights)
            )

        init = tuple(ops.zeros((a, ops.shape(r)[1]), left.dtype) for r in rights)
        accs = ops.fori_loop(ops.take(first, e), ops.take(end, e), block_step, init)
        return tuple(
            ops.slice_update(o, (e, 0, 0), ops.expand_dims(acc, 0)) for o, acc in zip(outs, accs)
        )

    init = tuple(ops.zeros((plan.num_experts, a, ops.shape(r)[1]), left.dtype) for r in rights)
    return list(ops.fori_loop(0, plan.num_experts, expert_step, init))


def _scan_gather_backward(x, upstreams, kernels, plan):
    """`gather_matmul`'s backward pass as one loop: `(d_x, d_kernels)`.

    Each block reads its token rows and output gradients once for both the
    kernel gradient and the token gradient (scatter-added into the tokens:
    a token occurs at most once per expert). One loop also keeps XLA from
    scheduling the optimizer's in-place kernel update before a loop that
    still reads the kernel, which would make it copy the kernel.
    """
    first, end = _block_ranges(plan)
    size = plan.block_size
    d = ops.shape(x)[1]

    def expert_step(e, carry):
        expert_kernels = [_expert_slice(k, e) for k in kernels]

        def block_step(n, carry):
            d_table, accs = carry
            start = n * size
            rows = _block(x, plan, start, True)  # (B, d)
            grads = [_block(u, plan, start, False) for u in upstreams]  # (B, h)
            accs = tuple(acc + ops.matmul(ops.transpose(rows), g) for acc, g in zip(accs, grads))
            d_rows = sum(
                (ops.matmul(g, ops.transpose(k)) for g, k in zip(grads, expert_kernels))
            )  # (B, d)
            return _add_into_tokens(d_table, plan, start, d_rows), accs

        d_table, d_kernels = carry
        init = tuple(ops.zeros(ops.shape(k)[1:], x.dtype) for k in kernels)
        d_table, accs = ops.fori_loop(
            ops.take(first, e), ops.take(end, e), block_step, (d_table, init)
        )
        d_kernels = tuple(
            ops.slice_update(dk, (e, 0, 0), ops.expand_dims(acc, 0))
            for dk, acc in zip(d_kernels, accs)
        )
        return d_table, d_kernels

    init = (
        ops.zeros(ops.shape(x), x.dtype),
        tuple(ops.zeros(ops.shape(k), x.dtype) for k in kernels),
    )
    d_x, d_kernels = ops.fori_loop(0, plan.num_experts, expert_step, init)
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


def _scan_combine_backward(upstream, inputs, weights, kernels, bias, plan, activation, mask):
    """`matmul_combine`'s backward pass as one loop.

    Returns `(d_inputs, d_weights (R,), d_kernels (E, h, d), d_bias (E, d)
    or None)`. Each block recomputes its hidden rows from the first
    projections and reads its rows of the output gradient once (gathered
    from the tokens) for everything, so nothing `(R, d)` is made and the
    only `(R, h)` tensors are the input gradients.
    """
    first, end = _block_ranges(plan)
    size = plan.block_size
    rows = ops.shape(inputs[0])[0]
    h, d = ops.shape(kernels)[1], ops.shape(kernels)[2]
    dtype = inputs[0].dtype
    has_bias = bias is not None

    def expert_step(e, carry):
        kernel = _expert_slice(kernels, e)  # (h, d)
        bias_column = ops.expand_dims(_expert_slice(bias, e), -1) if has_bias else None

        def block_step(n, carry):
            d_inputs, d_weights, accs = carry
            start = n * size
            block_mask = None if mask is None else _block(mask, plan, start, False)
            hidden, backward = _hidden_and_vjp(
                [_block(t, plan, start, False) for t in inputs], activation, block_mask
            )  # (B, h)
            g = _block(upstream, plan, start, True)  # (B, d)
            w = ops.slice(weights, (start,), (size,))  # (B,)
            d_scaled = ops.matmul(g, ops.transpose(kernel))  # (B, h)
            d_w = ops.sum(hidden * d_scaled, axis=-1)
            if has_bias:
                d_w = d_w + ops.matmul(g, bias_column)[:, 0]
            d_block = _input_grads(d_scaled * ops.expand_dims(w, -1), backward, block_mask)
            d_inputs = tuple(
                ops.slice_update(t, (start, 0), db) for t, db in zip(d_inputs, d_block)
            )
            d_weights = ops.slice_update(d_weights, (start,), d_w)
            scaled_t = ops.transpose(hidden * ops.expand_dims(w, -1))  # (h, B)
            new_accs = (accs[0] + ops.matmul(scaled_t, g),)
            if has_bias:
                new_accs += (accs[1] + ops.matmul(ops.expand_dims(w, 0), g),)
            return d_inputs, d_weights, new_accs

        d_inputs, d_weights, d_kernels, d_bias = carry
        init = (ops.zeros((h, d), dtype),) + ((ops.zeros((1, d), dtype),) if has_bias else ())
        d_inputs, d_weights, accs = ops.fori_loop(
            ops.take(first, e), ops.take(end, e), block_step, (d_inputs, d_weights, init)
        )
        d_kernels = ops.slice_update(d_kernels, (e, 0, 0), ops.expand_dims(accs[0], 0))
        if has_bias:
            d_bias = ops.slice_update(d_bias, (e, 0), accs[1])
        return d_inputs, d_weights, d_kernels, d_bias

    init = (
        tuple(ops.zeros((rows, h), dtype) for _ in inputs),
        ops.zeros((rows,), dtype),
        ops.zeros(ops.shape(kernels), dtype),
        ops.zeros((plan.num_experts, d) if has_bias else (1, 1), dtype),
    )
    d_inputs, d_weights, d_kernels, d_bias = ops.fori_loop(
        0, plan.num_experts, expert_step, init
    )
    return list(d_inputs), d_weights, d_kernels, (d_bias if has_bias else None)


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
    if strategy == "scan":
        outs = _scan_matmul(sources, kernels, plan, transpose, gathered, combined, scale, bias)
        return outs[0] if combined or not many else outs
    distinct, index = _unique(sources)
    rows = [blocks.take_rows(t, plan) if gathered else t for t in distinct]
    if scale is not None:
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
    if bias is not None:
        ys[0] = ys[0] + ops.expand_dims(scale, -1) * ops.take(bias, plan.row_experts, axis=0)
    if combined:
        return blocks.sum_rows(sum(ys[1:], ys[0]), plan)
    return ys if many else ys[0]


def outer_rows(
    left, rights, plan, strategy, left_gathered=False, right_gathered=False, left_scale=None
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

    Returns:
        `(E, a, b)`, or a list of them if `rights` is a list.
    """
    many = isinstance(rights, (list, tuple))
    rights = _as_list(rights)
    if strategy == "scan":
        outs = _scan_outer(left, rights, plan, left_gathered, right_gathered, left_scale)
        return outs if many else outs[0]
    left = blocks.take_rows(left, plan) if left_gathered else left
    if left_scale is not None:
        left = left * ops.expand_dims(left_scale, -1)
    outs = []
    for right in rights:
        right = blocks.take_rows(right, plan) if right_gathered else right
        if strategy == "grouped":
            outs.append(fast.grouped_outer(left, right, plan.group_sizes))
            continue
        size = plan.block_size
        x = ops.reshape(left, (-1, size, ops.shape(left)[1]))
        g = ops.reshape(right, (-1, size, ops.shape(right)[1]))
        per_block = ops.einsum("nba,nbc->nac", x, g)  # (blocks, a, b)
        outs.append(ops.segment_sum(per_block, plan.block_experts, num_segments=plan.num_experts))
    return outs if many else outs[0]


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
        return tuple(matmul_rows(x, kernels, p, strategy, gathered=True))

    def backward(upstream, x, *rest):
        kernels, tables = list(rest[:count]), rest[count:]
        p = blocks.with_tensors(plan, tables)
        upstream = list(upstream)
        if strategy == "scan":
            d_x, d_kernels = _scan_gather_backward(x, upstream, kernels, p)
            return (d_x, *d_kernels)
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
        activation: `None` (`inputs` is the hidden rows) or a function of
            the `inputs` giving the hidden rows, elementwise (its gradient
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
        if strategy == "scan":
            d_inputs, d_weights, d_kernels, d_bias = _scan_combine_backward(
                upstream, inputs, weights, kernels, bias, p, activation, mask
            )
        else:
            hidden, vjp_fn = _hidden_and_vjp(inputs, activation, mask)
            scale = ops.expand_dims(weights, -1)
            d_scaled = matmul_rows(upstream, kernels, p, strategy, transpose=True, gathered=True)
            d_kernels = outer_rows(hidden, upstream, p, strategy, right_gathered=True, left_scale=weights)
            d_weights = ops.sum(hidden * d_scaled, axis=-1)  # (R,)
            d_inputs = _input_grads(d_scaled * scale, vjp_fn, mask)
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
