"""Per-expert row pieces and row gathers with as few operators as possible.

The `"ranges"` expert loop (PyTorch, TensorFlow graphs) reads each expert's
exact rows of several `(R, ...)` tensors and gathers token rows by index.
Written per expert with `ops.slice` and `ops.take`, a TensorFlow graph
holds about 300 operators per expert for one training step (20 000 at
E = 64), mostly the packing of dynamic slice bounds and `take`'s
negative-index fix-up, and the executor's per-operator cost made the
E = 64 step 1.7x the dense FFN's. Here:

- `split_rows` cuts a tensor into all the experts' pieces at once: one
  `tf.split` in a TensorFlow graph (row pieces share the buffer, no copy),
  `torch.split` views on PyTorch; elsewhere one `ops.slice` per piece.
- `gather_rows` is `tf.gather` / `index_select`: the indices are row
  numbers, never negative, so `ops.take`'s fix-up is not needed.

`portable=True` gives the `keras.ops` forms (for tests).
"""

import keras
from keras import ops

from keras_moe.backend.constants import as_tensor


def split_rows(t, sizes, portable=False):
    """`t`'s first `sum(sizes)` rows as consecutive pieces of `sizes[i]` rows.

    Args:
        t: `(n, ...)` tensor.
        sizes: a list of Python ints, or an `(m,)` int tensor (`m` static),
            summing to at most `n`.
        portable: bool, `ops.slice` per piece on every backend.

    Returns:
        A list of `m` tensors, piece `i` of shape `(sizes[i], ...)`.

    Examples:
        >>> import numpy as np
        >>> t = np.arange(12, dtype="float32").reshape(6, 2)
        >>> [np.asarray(p).tolist() for p in split_rows(t, [1, 0, 3])]
        [[[0.0, 1.0]], [], [[2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]]
    """
    t = ops.convert_to_tensor(t)
    host = isinstance(sizes, (list, tuple))
    count = len(sizes) if host else int(sizes.shape[0])
    backend = keras.backend.backend()
    if not portable and backend == "tensorflow":
        import tensorflow as tf

        sizes = tf.cast(sizes, "int32")
        rest = tf.shape(t)[0] - tf.reduce_sum(sizes)
        return tf.split(t, tf.concat([sizes, [rest]], axis=0), num=count + 1)[:count]
    if not portable and backend == "torch" and host:
        import torch

        sizes = [int(s) for s in sizes]
        return list(torch.split(t, sizes + [t.shape[0] - sum(sizes)]))[:count]
    if host:
        starts = [sum(sizes[:i]) for i in range(count)]
    else:
        starts = ops.cumsum(sizes) - sizes
    rest = tuple(ops.shape(t)[1:])
    zeros = (0,) * len(rest)
    return [ops.slice(t, (starts[i],) + zeros, (sizes[i],) + rest) for i in range(count)]


def gather_rows(table, indices, portable=False):
    """`table[indices]`: rows of `table (n, ...)` at `indices (m,)`, all in `0 .. n - 1`.

    Args:
        table: `(n, ...)` tensor.
        indices: `(m,)` int tensor of row numbers (not negative).
        portable: bool, `ops.take` on every backend.

    Returns:
        `(m, ...)` tensor.

    Examples:
        >>> import numpy as np
        >>> table = np.array([[1.0], [2.0], [3.0]], "float32")
        >>> np.asarray(gather_rows(table, np.array([2, 0, 2], "int32"))).tolist()
        [[3.0], [1.0], [3.0]]
    """
    backend = keras.backend.backend()
    if not portable and backend == "tensorflow":
        import tensorflow as tf

        return tf.gather(table, indices)
    if not portable and backend == "torch":
        import torch

        table, indices = as_tensor(table), as_tensor(indices)
        return torch.index_select(table, 0, indices.to(device=table.device))
    return ops.take(table, indices, axis=0)
