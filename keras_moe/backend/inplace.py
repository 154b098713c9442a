"""Writes into buffers that a loop fills block by block, in place where it matters.

Keras' functional `ops.slice_update` / `ops.scatter_update` return a new
tensor: XLA turns that into an in-place update of a loop carry, but Keras'
torch backend clones the whole buffer on every call. The expert loops of
dropless dispatch write once per block into `(R, h)` and `(T, d)` buffers
that they made themselves, so on PyTorch they write in place. Elsewhere,
and with `portable=True`, these are the `keras.ops` functions.
"""

import keras
from keras import ops


def host_ints(t):
    """A small integer tensor as a list of Python ints (one read to the host).

    PyTorch: `Tensor.tolist()`; Keras' `convert_to_numpy` goes through
    `np.array(tensor)`, which NumPy 2 answers with a DeprecationWarning for
    torch tensors (their `__array__` takes no `copy` argument).
    """
    if keras.backend.backend() == "torch":
        return [int(v) for v in t.tolist()]
    return [int(v) for v in ops.convert_to_numpy(t).reshape(-1)]


def eager_shapes():
    """Whether tensor sizes can be read as Python ints here (PyTorch, eager TensorFlow).

    Not under `torch.compile`: a size read on the host breaks its graph and
    specializes it to one routing.
    """
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return not torch.compiler.is_compiling()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    return False


def write_slice(buffer, start_indices, update, portable=False):
    """`buffer` with `update` written at `start_indices` (`ops.slice_update`).

    On PyTorch `buffer` is modified in place and returned: pass only a
    buffer nothing else reads.
    """
    if portable or keras.backend.backend() != "torch":
        return ops.slice_update(buffer, start_indices, update)
    update = ops.convert_to_tensor(update)
    index = tuple(slice(s, s + n) for s, n in zip(start_indices, update.shape))
    buffer[index] = update
    return buffer


def add_rows(table, indices, rows, portable=False):
    """`table` with `rows (n, b)` added to its rows `indices (n,)` (duplicates add up).

    On PyTorch `table` is modified in place (`index_add_`) and returned.
    """
    if portable or keras.backend.backend() != "torch":
        return ops.scatter_update(table, ops.expand_dims(indices, -1), rows, reduction="add")
    import torch

    indices, rows = ops.convert_to_tensor(indices), ops.convert_to_tensor(rows)
    return table.index_add_(0, indices.to(torch.int64), rows.to(table.dtype))


def after(value, dependencies):
    """`value`, computed only after `dependencies` (a tensor or nested tuple) in a TF graph.

    A TensorFlow graph runs independent ops in parallel: the experts of an
    unrolled Python loop would all hold their transients at once. Ordering
    each expert after the previous one's results bounds the memory to one
    expert's. Eager backends and XLA run in order anyway: `value`.
    """
    if keras.backend.backend() != "tensorflow":
        return value
    import tensorflow as tf

    if tf.executing_eagerly():
        return value
    with tf.control_dependencies(tf.nest.flatten(dependencies)):
        return tf.identity(value)
