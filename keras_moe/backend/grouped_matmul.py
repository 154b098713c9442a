"""Grouped (ragged) matmul over rows sorted by expert.

`grouped_matmul(x, kernels, group_sizes)` computes, for rows `x (N, d)`
sorted so that the first `group_sizes[0]` rows belong to expert 0, the next
`group_sizes[1]` to expert 1, and so on, `y[i] = x[i] @ kernels[e(i)]`. Rows
after `sum(group_sizes)` are padding: their output is unspecified (finite),
and callers discard it.

`grouped_outer(x, dy, group_sizes)` is its kernel gradient. Dropless
dispatch uses both for its `"grouped"` strategy (see
`keras_moe.dispatch.grouped`).

Fast paths, chosen by `has_grouped_matmul()`:
- JAX on GPU/TPU: `jax.lax.ragged_dot` (on CPU XLA lowers it to a dense
  product over every group, E times the work, so it is not offered there;
  on an H100 with jax 0.11 it was slower than the batched blocks layout).
  On Hopper GPUs `KERAS_MOE_GROUPED_MATMUL=pallas` selects JAX's Pallas
  Mosaic-GPU kernels instead (`jax.experimental.pallas.ops.gpu`:
  `ragged_dot_mgpu` for the products, `transposed_ragged_dot_mgpu` for the
  kernel gradient), where the shapes fit their tiles; `xla` forces
  `ragged_dot`. Read at trace time, so one process can compare both.
- PyTorch: `torch._grouped_mm` (with an explicit backward: its autograd
  formula rejects the expanded gradients Keras losses produce).
- TensorFlow outside XLA: a split into per-expert row ranges (dynamic sizes)
  and one matmul per expert; exact work, no padding.
"""

import functools
import os

import keras

from keras_moe.backend.constants import as_tensor
from keras_moe.backend.gradients import made_once
from keras_moe.backend.rows import split_rows


def _fast_path_name():
    backend = keras.backend.backend()
    if backend == "tensorflow":
        # Dynamic-size splits are fine in TF graphs and eagerly, not under XLA.
        return None if _in_tf_xla_context() else "tf_split_matmul"
    return _static_fast_path_name(backend)


def _in_tf_xla_context():
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    if tf.executing_eagerly():
        return False
    graph = tf.compat.v1.get_default_graph()
    return control_flow_util.GraphOrParentsInXlaContext(graph)


@functools.lru_cache(maxsize=None)
def _static_fast_path_name(backend):
    if backend == "jax":
        import jax

        if hasattr(jax.lax, "ragged_dot") and jax.default_backend() != "cpu":
            return "jax_ragged_dot"
    elif backend == "torch":
        import torch

        if hasattr(torch, "_grouped_mm"):
            return "torch_grouped_mm"
    return None


@functools.lru_cache(maxsize=None)
def on_accelerator():
    """Whether the backend computes on a GPU or TPU by default."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    return False


def has_grouped_matmul():
    """Whether this backend and device have a grouped-matmul fast path."""
    return _fast_path_name() is not None


def _jax_kernel_choice():
    """`"pallas"` or `"xla"`: which JAX grouped matmul.

    `KERAS_MOE_GROUPED_MATMUL` chooses; by default the Pallas kernels on
    Hopper GPUs (on an H200 with T = 16384, hidden 2048, bf16 they made the
    training step 4.6x faster than `ragged_dot` at E = 8, and `ragged_dot`
    ran out of memory at E = 64), `ragged_dot` elsewhere.
    """
    chosen = os.environ.get("KERAS_MOE_GROUPED_MATMUL", "").lower()
    if chosen not in ("", "xla", "pallas"):
        raise ValueError(
            f"KERAS_MOE_GROUPED_MATMUL must be 'xla' or 'pallas'. Received: {chosen!r}"
        )
    if chosen:
        return chosen
    return "pallas" if has_pallas_grouped_matmul() else "xla"


@functools.lru_cache(maxsize=None)
def cuda_capability():
    """`(major, minor)` of the backend's default CUDA device, or `None`."""
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            device = jax.devices()[0]
            if device.platform != "gpu":
                return None
            capability = getattr(device, "compute_capability", None)
            if capability is None:
                return None
            major, minor = str(capability).split(".")[:2]
            return int(major), int(minor)
        if backend == "torch":
            import torch

            return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None
    return None


@functools.lru_cache(maxsize=None)
def has_pallas_grouped_matmul():
    """Whether JAX's Pallas Mosaic-GPU grouped matmul runs here (JAX on a Hopper GPU)."""
    if keras.backend.backend() != "jax" or cuda_capability() is None:
        return False
    if cuda_capability()[0] != 9:  # wgmma: Hopper only
        return False
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # noqa: F401
        from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


# Tiles of the Pallas kernels: (block_m, block_n, block_k, max_concurrent_steps).
# 128 x 128 output tiles with a 4-stage pipeline of 64-deep slices fit in the
# shared memory of a Hopper SM (160 KiB in bf16) and are among the fastest
# settings of the kernels' own tuning sweeps.
PALLAS_TILES = (128, 128, 64, 4)


def _pallas_tiles():
    block_m, block_n, block_k, steps = PALLAS_TILES
    return dict(
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        max_concurrent_steps=steps,
        grid_block_n=1,
    )


def _pallas_ragged_dot(x, kernels, group_sizes):
    """`ragged_dot` through the Mosaic-GPU kernel, or `None` if the shapes don't fit."""
    import jax
    import jax.numpy as jnp

    _, block_n, block_k, _ = PALLAS_TILES
    n, d = x.shape
    h = kernels.shape[2]
    if d % block_k or h % block_n or x.dtype not in (jnp.bfloat16, jnp.float16):
        return None
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    kernels = kernels.astype(x.dtype)
    # Rows after the last group are never written by the kernel: the last
    # group takes them (finite values, discarded by the caller).
    sizes = group_sizes.astype("int32")
    sizes = sizes.at[-1].add(n - jnp.sum(sizes))
    return ragged_dot_mgpu.ragged_dot(x, kernels, group_sizes=sizes, **_pallas_tiles())


def _pallas_ragged_outer(left, right, group_sizes):
    """`grouped_outer` through the Mosaic-GPU kernel, or `None` if the shapes don't fit."""
    import jax.numpy as jnp

    block_m, block_n, _, _ = PALLAS_TILES
    a, b = left.shape[1], right.shape[1]
    if a % block_m or b % block_n or left.dtype not in (jnp.bfloat16, jnp.float16):
        return None
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    return transposed_ragged_dot_mgpu.transposed_ragged_dot(
        left, right.astype(left.dtype), group_sizes=group_sizes.astype("int32"), **_pallas_tiles()
    )


def grouped_matmul(x, kernels, group_sizes):
    """Grouped matmul of sorted rows, see the module docstring.

    Args:
        x: `(N, d)` rows sorted by group.
        kernels: `(E, d, h)` one matrix per group.
        group_sizes: `(E,)` int32 rows per group, multiples of 8 (PyTorch's
            alignment); may sum to less than `N`.

    Returns:
        `(N, h)` in the dtype of `x`.
    """
    name = _fast_path_name()
    x, kernels, group_sizes = (as_tensor(t) for t in (x, kernels, group_sizes))
    if name == "jax_ragged_dot":
        import jax

        if _jax_kernel_choice() == "pallas":
            out = _pallas_ragged_dot(x, kernels, group_sizes)
            if out is not None:
                return out
        return jax.lax.ragged_dot(x, kernels, group_sizes.astype("int32"))
    if name == "torch_grouped_mm":
        return _torch_grouped_mm(x, kernels, group_sizes)
    if name == "tf_split_matmul":
        return _tf_split_matmul(x, kernels, group_sizes)
    raise NotImplementedError(
        "No grouped-matmul fast path on this backend/device; check "
        "has_grouped_matmul() and use keras_moe.dispatch.blocks instead."
    )


def grouped_outer(left, right, group_sizes):
    """Per group, the sum of `left[i]^T right[i]` over its rows.

    The kernel gradient of `grouped_matmul`: with `y = grouped_matmul(x,
    kernels, group_sizes)`, `d kernels = grouped_outer(x, dy, group_sizes)`.

    Args:
        left: `(N, a)` rows sorted by group.
        right: `(N, b)` rows, same order.
        group_sizes: `(E,)` int32 rows per group, multiples of 8 (PyTorch's
            alignment); rows after their sum are ignored.

    Returns:
        `(E, a, b)` in the dtype of `left`.
    """
    name = _fast_path_name()
    left, right, group_sizes = (
        as_tensor(t) for t in (left, right, group_sizes)
    )
    if name == "jax_ragged_dot":
        if _jax_kernel_choice() == "pallas":
            out = _pallas_ragged_outer(left, right, group_sizes)
            if out is not None:
                return out
        return _jax_ragged_outer(left, right, group_sizes.astype("int32"))
    if name == "torch_grouped_mm":
        return _torch_grouped_outer(left, right, group_sizes)
    if name == "tf_split_matmul":
        return _tf_split_outer(left, right, group_sizes)
    raise NotImplementedError(
        "No grouped-matmul fast path on this backend/device; check has_grouped_matmul()."
    )


def _torch_offsets(group_sizes, rows):
    import torch

    offsets = torch.cumsum(group_sizes, 0, dtype=torch.int32)
    # Padding rows join the last group: computed, then discarded by the caller.
    return torch.nn.functional.pad(offsets[:-1], (0, 1), value=rows)


def _torch_pad(t, rows_to, cols_to):
    import torch

    pad_rows, pad_cols = -t.shape[0] % rows_to, -t.shape[1] % cols_to
    return torch.nn.functional.pad(t, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else t


def _torch_grouped_mm(x, kernels, group_sizes):
    import torch

    n, d = x.shape
    h = kernels.shape[2]
    kernels = kernels.to(x.dtype)
    # torch._grouped_mm wants 16-byte aligned rows in the forward and in the
    # backward (where the row count is the inner dimension): pad rows and
    # both feature sizes to multiples of 8 with zeros.
    x = _torch_pad(x, 8, 8)
    pad_d, pad_h = -d % 8, -h % 8
    if pad_d or pad_h:
        kernels = torch.nn.functional.pad(kernels, (0, pad_h, 0, pad_d))
    offsets = _torch_offsets(group_sizes, x.shape[0])
    return _torch_grouped_mm_function().apply(x, kernels, offsets)[:n, :h]


def _torch_grouped_outer(left, right, group_sizes):
    import torch

    a, b = left.shape[1], right.shape[1]
    right = right.to(left.dtype)
    left, right = _torch_pad(left, 8, 8), _torch_pad(right, 8, 8)
    # The groups split the inner (row) dimension: (a, N) @ (N, b) per group;
    # rows after the last group are left out.
    offsets = torch.cumsum(group_sizes, 0, dtype=torch.int32)
    out = _torch_grouped_mm_strided(left.t(), right.contiguous(), offsets)
    return out[:, :a, :b]


_STRIDED_OK = {}


def _torch_grouped_mm_strided(a, b, offsets):
    """`torch._grouped_mm` on transposed views where it takes them (no copy).

    A transposed operand is column-major, which `_grouped_mm` accepts on
    CPUs and on Hopper (cuBLAS / CUTLASS read either order); copying it
    contiguous cost 5-7 ms of a 53 ms training step on an H200. Where a
    build refuses the view, the copy is made, and remembered per device.
    """
    import torch

    key = a.device.type
    if _STRIDED_OK.get(key, True) and torch.compiler.is_compiling():
        # No probing inside a trace (writing the cache is a graph break):
        # the views, unless an eager call found them refused. The grouped
        # strategy is chosen under torch.compile on CPUs and Hopper only,
        # which take them.
        return torch._grouped_mm(a, b, offs=offsets)
    if _STRIDED_OK.get(key, True):
        try:
            out = torch._grouped_mm(a, b, offs=offsets)
            _STRIDED_OK[key] = True
            return out
        except RuntimeError:
            _STRIDED_OK[key] = False
    return torch._grouped_mm(a.contiguous(), b.contiguous(), offs=offsets)


def _tf_split_matmul(x, kernels, group_sizes):
    import tensorflow as tf

    num_groups = kernels.shape[0]
    rest = tf.shape(x)[0] - tf.reduce_sum(group_sizes)
    pieces = split_rows(x, group_sizes)
    # unstack, not kernels[e]: each slice's gradient would be a full-size
    # (E, d, h) tensor, E of them.
    per_group = tf.unstack(kernels, num=num_groups)
    outputs = [tf.matmul(pieces[e], per_group[e]) for e in range(num_groups)]
    # Padding rows after the last group: zeros of the output width.
    outputs.append(tf.zeros((rest, kernels.shape[2]), x.dtype))
    return tf.concat(outputs, axis=0)


def _tf_split_outer(left, right, group_sizes):
    import tensorflow as tf

    num_groups = group_sizes.shape[0]
    lefts = split_rows(left, group_sizes)
    rights = split_rows(right, group_sizes)
    return tf.stack(
        [tf.matmul(lefts[e], rights[e], transpose_a=True) for e in range(num_groups)]
    )


def _jax_ragged_outer(left, right, group_sizes):
    import jax

    # The kernel gradient of ragged_dot, as JAX's own autodiff computes it.
    kernels = jax.numpy.zeros((group_sizes.shape[0], left.shape[1], right.shape[1]), left.dtype)
    _, vjp = jax.vjp(lambda k: jax.lax.ragged_dot(left, k, group_sizes), kernels)
    return vjp(right.astype(left.dtype))[0]


@made_once
def _torch_grouped_mm_function():
    """The autograd Function, made on first use (torch is imported lazily)."""
    import torch

    class TorchGroupedMM(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, kernels, offsets):
            ctx.save_for_backward(x, kernels, offsets)
            # `kernels` may be a transposed view (a backward pass's `k^T`).
            return _torch_grouped_mm_strided(x.contiguous(), kernels, offsets)

        @staticmethod
        def backward(ctx, grad):
            x, kernels, offsets = ctx.saved_tensors
            grad = grad.contiguous()
            grad_x = grad_kernels = None
            if ctx.needs_input_grad[0]:
                grad_x = _torch_grouped_mm_strided(grad, kernels.transpose(-1, -2), offsets)
            if ctx.needs_input_grad[1]:
                grad_kernels = _torch_grouped_mm_strided(x.t(), grad, offsets)
            return grad_x, grad_kernels, None

    return TorchGroupedMM


def keep_only_matmuls(fn):
    """`fn` whose backward pass stores only its matmul outputs (JAX).

    In a loop over expert blocks, JAX would otherwise store each step's
    slices of the expert kernels for the backward pass: a copy of the
    kernels per block. `jax.checkpoint` with a policy that saves matmul
    outputs recomputes the (cheap) slices instead. Other backends: `fn`.
    """
    if keras.backend.backend() != "jax":
        return fn
    import jax

    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
