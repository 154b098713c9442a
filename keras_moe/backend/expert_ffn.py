"""The whole dropless expert FFN, expert by expert, in one TensorFlow graph gradient.

Dropless dispatch runs an expert FFN as two functions with hand-written
backward passes (`keras_moe.dispatch.gather_matmul`, the first
projections, and `matmul_combine`, the activation and the weighted last
projection), joined by the `(R, h)` first projections. A TensorFlow graph
cannot write into a buffer in place, so the `"ranges"` loop builds each
`(R, h)` tensor from its experts' pieces with a concatenation, in the
forward pass (the projections) and in the backward pass (their gradients):
four `(R, h)` copies per step, the largest non-matmul cost of the E = 8
training step on CPU.

`expert_ffn` runs the whole FFN per expert inside one `tf.custom_gradient`
instead: the backward pass reads the forward pass's per-expert projection
pieces directly (they are what the two functions keep, without the
concatenation), and each expert's projection gradients are used where they
are made. Nothing else changes: the same per-expert row pieces
(`split_rows`), gathers recomputed in the backward pass, two experts in
flight (`keras_moe.dispatch.grouped`). On 2 CPU cores at E = 8, k = 2,
h = 1024, d = 512 the gradients took 450-465 ms instead of 480 ms, and the
training step went from 1.16-1.21x to 1.12-1.17x the dense FFN's (4
interleaved process pairs); at E = 64 the two measured alike. The step's
peak memory is about 15 MiB higher (the per-expert pieces are kept as they
are made).

It applies to TensorFlow graphs outside XLA with the `"ranges"` strategy
and returns `None` elsewhere; the caller then runs the two portable
functions, and the tests check that both agree.
"""

import keras

from keras_moe.backend.rows import split_rows


def expert_ffn(
    x,
    first_kernels,
    first_biases,
    down_kernel,
    down_bias,
    weights,
    plan,
    strategy,
    activation,
    mask=None,
    in_flight=2,
):
    """`sum_j w_tj * FFN_e(x_t)` over each token's assignments, or `None` where it does not apply.

    Args:
        x: `(T, d)` tokens.
        first_kernels: list of `(E, d, h)` first projections (`[up]` or
            `[up, gate]`).
        first_biases: list of `(E, h)` or `None`, one per first kernel.
        down_kernel: `(E, h, d)`.
        down_bias: `(E, d)` or `None`.
            The biases and the down kernel may be variables: they are read
            (autocast under mixed precision) only where this path applies.
        weights: `(R,)` combine weight of each row (of the plan).
        plan: a `keras_moe.dispatch.blocks.RowPlan` with `block_size == 1`.
        strategy: the dropless strategy; only `"ranges"` has this path.
        activation: `activation(*first_projections)` -> hidden rows.
        mask: `(R, h)` or `None`, multiplies the hidden rows (dropout).
        in_flight: how many experts may run at once (each waits for the
            results of the expert `in_flight` places before it).

    Returns:
        `(T, d)` tokens, or `None` (not a TensorFlow graph, XLA, another
        strategy).
    """
    if keras.backend.backend() != "tensorflow" or strategy != "ranges":
        return None
    import tensorflow as tf

    from keras_moe.backend.grouped_matmul import _in_tf_xla_context

    if tf.executing_eagerly() or _in_tf_xla_context() or plan.block_size != 1:
        return None
    num_experts = int(first_kernels[0].shape[0])
    count = len(first_kernels)
    has_first_bias = [b is not None for b in first_biases]
    has_down_bias = down_bias is not None
    sizes = tf.cast(plan.group_sizes, "int32")

    tokens = split_rows(plan.row_tokens, sizes)
    masks = split_rows(mask, sizes) if mask is not None else [None] * num_experts

    def hidden_of(projections, e):
        hidden = activation(*projections)
        return hidden if masks[e] is None else hidden * masks[e]

    def waits_for(finished):
        return finished[-in_flight] if len(finished) >= in_flight else []

    @tf.custom_gradient
    def ffn(x, weights, down_kernel, *rest):
        rest = list(rest)
        kernels, biases = [], []
        for has_bias in has_first_bias:
            kernels.append(tf.unstack(rest.pop(0), num=num_experts))
            biases.append(tf.unstack(rest.pop(0), num=num_experts) if has_bias else None)
        down = tf.unstack(down_kernel, num=num_experts)
        bias_down = tf.unstack(rest.pop(0), num=num_experts) if has_down_bias else None
        row_weights = [tf.expand_dims(w, -1) for w in split_rows(weights, sizes)]
        out = tf.zeros_like(x)
        saved, finished = [], []
        for e in range(num_experts):
            with tf.control_dependencies(waits_for(finished)):
                tok = tf.identity(tokens[e])
            rows = tf.gather(x, tok)
            projections = []
            for k, b in zip(kernels, biases):
                p = tf.matmul(rows, k[e])
                projections.append(p if b is None else p + b[e])
            saved.append(projections)
            y = tf.matmul(hidden_of(projections, e), down[e])
            if has_down_bias:
                y = y + bias_down[e]
            y = y * row_weights[e]
            out = tf.tensor_scatter_nd_add(out, tf.expand_dims(tok, -1), y)
            finished.append([y])

        def grad(upstream):
            d_x = tf.zeros_like(x)
            d_weights, d_down, d_bias_down = [], [], []
            d_kernels = [[] for _ in range(count)]
            d_biases = [[] for _ in range(count)]
            finished = []
            for e in range(num_experts):
                with tf.control_dependencies(waits_for(finished)):
                    tok = tf.identity(tokens[e])
                g = tf.gather(upstream, tok)  # (n, d)
                rows = tf.gather(x, tok)  # (n, d)
                with tf.GradientTape() as tape:
                    tape.watch(saved[e])
                    hidden = hidden_of(saved[e], e)  # (n, h)
                d_scaled = tf.matmul(g, down[e], transpose_b=True)  # (n, h)
                d_w = tf.reduce_sum(hidden * d_scaled, axis=-1)
                if has_down_bias:
                    d_w = d_w + tf.reduce_sum(g * bias_down[e], axis=-1)
                d_weights.append(d_w)
                # Not `g * row_weights[e]` into these two: with the routing a graph
                # constant (tests), TF 2.21's graph optimizer crashed the process
                # (SIGFPE) on that product for an expert without rows.
                d_down.append(tf.matmul(hidden * row_weights[e], g, transpose_a=True))
                if has_down_bias:
                    d_bias_down.append(tf.matmul(row_weights[e], g, transpose_a=True)[0])
                d_projections = tape.gradient(
                    hidden, saved[e], output_gradients=d_scaled * row_weights[e]
                )
                d_rows = None
                for i, (k, dp) in enumerate(zip(kernels, d_projections)):
                    d_kernels[i].append(tf.matmul(rows, dp, transpose_a=True))
                    if has_first_bias[i]:
                        d_biases[i].append(tf.reduce_sum(dp, axis=0))
                    term = tf.matmul(dp, k[e], transpose_b=True)
                    d_rows = term if d_rows is None else d_rows + term
                d_x = tf.tensor_scatter_nd_add(d_x, tf.expand_dims(tok, -1), d_rows)
                finished.append([d_rows, d_down[-1]] + [d[-1] for d in d_kernels])
            # Rows after the experts' (masked assignments) get no gradient.
            unused = tf.shape(weights)[0] - tf.reduce_sum(sizes)
            d_weights.append(tf.zeros([unused], weights.dtype))
            grads = [d_x, tf.concat(d_weights, axis=0), tf.stack(d_down)]
            for i in range(count):
                grads.append(tf.stack(d_kernels[i]))
                if has_first_bias[i]:
                    grads.append(tf.stack(d_biases[i]))
            if has_down_bias:
                grads.append(tf.stack(d_bias_down))
            return grads

        return out, grad

    args = [x, tf.cast(weights, x.dtype), down_kernel]
    for k, b in zip(first_kernels, first_biases):
        args.append(k)
        if b is not None:
            args.append(b)
    if has_down_bias:
        args.append(down_bias)
    return ffn(*[tf.convert_to_tensor(getattr(a, "value", a)) for a in args])
