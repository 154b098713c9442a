"""Contractions of stacked weights, written so every backend gets them right.

TensorFlow's oneDNN CPU kernels mishandle batched matmuls whose batch
dimensions broadcast against a size-1 dimension (TF 2.21: `tf.einsum(
"...ecd,edh->...ech")` with `E = 1` segfaults or corrupts the heap, and
`tf.matmul` of `(g, 1, c, d)` by `(1, 1, d, h)` aborts). The functions here
only ever issue plain 2-D matmuls or batched matmuls whose batch dimension is
the stack axis on both operands, which are correct for every size.
"""

from keras import ops


def stacked_matmul(x, kernels, axis=-3):
    """Multiplies slice `s` of `x` along `axis` by `kernels[s]`.

    Args:
        x: `(..., S, ..., d)`, the stack axis at `axis` (negative, before the
            last axis), the contracted features last.
        kernels: `(S, d, h)`.
        axis: the stack axis of `x`, counted from the end. Defaults to -3
            (a capacity buffer `(..., E, C, d)`).

    Returns:
        `x`'s shape with the last dimension `h`.
    """
    shape = ops.shape(x)
    rank = len(shape)
    axis = axis % rank
    # (S, everything else, d): the stack axis becomes the only batch axis.
    perm = (axis,) + tuple(i for i in range(rank - 1) if i != axis) + (rank - 1,)
    moved = ops.transpose(x, perm)
    moved_shape = ops.shape(moved)
    stacks = ops.shape(kernels)[0]
    y = ops.matmul(ops.reshape(moved, (stacks, -1, shape[-1])), kernels)  # (S, M, h)
    y = ops.reshape(y, tuple(moved_shape[:-1]) + (ops.shape(kernels)[-1],))
    inverse = [0] * rank
    for position, source in enumerate(perm):
        inverse[source] = position
    return ops.transpose(y, inverse)


def shared_input_matmul(x, kernels):
    """Every stack's kernel applied to the same input: `(..., d)` -> `(..., S, h)`.

    One 2-D matmul against the kernels laid side by side, `(d, S * h)`.
    """
    stacks, d, h = ops.shape(kernels)
    side_by_side = ops.reshape(ops.transpose(kernels, (1, 0, 2)), (d, stacks * h))
    y = ops.matmul(x, side_by_side)
    return ops.reshape(y, tuple(ops.shape(x)[:-1]) + (stacks, h))
