"""Constants and counts made on the device, without a host round trip.

Keras' PyTorch backend turns a Python number given to ops such as
`maximum`, `minimum`, `where` or `repeat` into a tensor with
`torch.as_tensor(value, device=...)`: on a GPU that is a blocking
host-to-device copy, so every such op waits for the GPU to drain its queue.
`ops.segment_sum` does the same with a shape. On an H200 a dropless
SparseMoE training step made 35 of these copies and the GPU sat idle for a
third of the step. `scalar_like` fills a 0-d tensor on the device instead,
and `count_ids` counts with an in-place `index_add_`. On other backends
they are the plain `keras.ops` forms (constants are free there).
"""

import keras
from keras import ops


def scalar_like(value, x, dtype=None):
    """`value` as a 0-d tensor on `x`'s device, in `dtype` (default: `x`'s dtype).

    Args:
        value: a Python number.
        x: a tensor (its device and, by default, dtype).
        dtype: optional dtype name.

    Returns:
        A 0-d tensor.

    Examples:
        >>> import numpy as np
        >>> x = np.zeros((2, 3), "float32")
        >>> c = scalar_like(0.5, x)
        >>> tuple(c.shape), keras.backend.standardize_dtype(c.dtype)
        ((), 'float32')
        >>> float(scalar_like(7, x, dtype="int32"))
        7.0
    """
    if keras.backend.backend() == "torch":
        import torch

        x = ops.convert_to_tensor(x)
        if dtype is not None:
            dtype = getattr(torch, keras.backend.standardize_dtype(dtype))
        return torch.full((), value, dtype=dtype or x.dtype, device=x.device)
    return ops.convert_to_tensor(value, dtype or keras.backend.standardize_dtype(x.dtype))


def as_tensor(x):
    """`x` as a backend tensor: `x` itself if it is a PyTorch tensor already.

    `keras.ops.convert_to_tensor` checks its argument for symbolic tensors
    (a structure flatten), standardizes the dtype and moves the tensor to
    Keras' device on every call, a few microseconds of host time each. The
    fast paths convert every argument they receive, most of them tensors
    already: on PyTorch those are used as they are. Anything else (variables,
    arrays, other backends' tensors) goes through `convert_to_tensor`.

    Examples:
        >>> import numpy as np
        >>> tuple(as_tensor(np.zeros((2, 3), "float32")).shape)
        (2, 3)
    """
    if keras.backend.backend() == "torch":
        import torch

        if type(x) is torch.Tensor:
            return x
    return ops.convert_to_tensor(x)


def count_ids(ids, num_segments, dtype="float32", portable=False, where=None):
    """How often each of `0 .. num_segments - 1` occurs in the int tensor `ids` (any shape).

    Ids outside the range are not counted. `portable=True` uses
    `ops.segment_sum` on every backend (for tests).

    Args:
        ids: int tensor, any shape.
        num_segments: int.
        dtype: dtype name of the counts. Defaults to `"float32"`.
        portable: bool, `ops.segment_sum` on every backend.
        where: optional bool tensor broadcastable to `ids`; ids where it is
            False are not counted (masked tokens, left-out assignments).

    Returns:
        `(num_segments,)` counts in `dtype`.

    Examples:
        >>> import numpy as np
        >>> ids = np.array([[0, 2], [2, 3], [4, -1]], "int32")  # 4 and -1: out of range
        >>> np.asarray(count_ids(ids, 4)).tolist()
        [1.0, 0.0, 2.0, 1.0]
        >>> np.asarray(count_ids(ids, 4, where=np.array([[True], [False], [True]]))).tolist()
        [1.0, 0.0, 1.0, 0.0]
    """
    ids = ops.convert_to_tensor(ids)
    if where is not None:
        where = ops.reshape(ops.broadcast_to(ops.cast(where, "bool"), ops.shape(ids)), (-1,))
    ids = ops.reshape(ids, (-1,))
    if keras.backend.backend() == "torch" and not portable:
        import torch

        ids = ids.to(torch.int64)
        keep = (ids >= 0) & (ids < num_segments)
        if where is not None:
            keep = keep & where
        ones = keep.to(getattr(torch, keras.backend.standardize_dtype(dtype)))
        # Uncounted ids add zero at index 0.
        index = torch.where(keep, ids, torch.zeros_like(ids))
        counts = torch.zeros(num_segments, dtype=ones.dtype, device=ids.device)
        return counts.index_add_(0, index, ones)
    # One extra segment collects the uncounted ids.
    ids = ops.cast(ids, "int32")
    inside = ops.logical_and(ids >= 0, ids < num_segments)
    if where is not None:
        inside = ops.logical_and(inside, where)
    ids = ops.where(inside, ids, num_segments)
    counts = ops.segment_sum(
        ops.cast(inside, dtype), ids, num_segments=num_segments + 1, sorted=False
    )
    return counts[:num_segments]


def segment_sum(data, segment_ids, num_segments, portable=False):
    """`ops.segment_sum` with a static `num_segments`, ids all in `0 .. num_segments - 1`.

    Keras' torch `segment_sum` repeats the ids to the data's shape with
    `repeat_interleave`, an operator whose output shape depends on tensor
    values: `torch.compile` breaks its graph there. On PyTorch this is one
    `index_add_` into zeros of the static result shape. `portable=True`
    uses `ops.segment_sum` on every backend (for tests).

    Args:
        data: `(n, ...)` tensor.
        segment_ids: `(n,)` int tensor, every id in range (PyTorch raises on
            others).
        num_segments: int.

    Returns:
        `(num_segments, ...)` sums in `data`'s dtype.

    Examples:
        >>> import numpy as np
        >>> data = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "float32")
        >>> np.asarray(segment_sum(data, np.array([2, 0, 2], "int32"), 3)).tolist()
        [[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]]
    """
    data = ops.convert_to_tensor(data)
    if keras.backend.backend() == "torch" and not portable:
        import torch

        ids = ops.convert_to_tensor(segment_ids).reshape(-1).to(torch.int64)
        out = torch.zeros((num_segments,) + tuple(data.shape[1:]), dtype=data.dtype, device=data.device)
        return out.index_add_(0, ids, data)
    return ops.segment_sum(data, segment_ids, num_segments=num_segments)
