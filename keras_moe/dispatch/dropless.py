"""Dropless dispatch: every routed assignment is computed exactly once."""

import os

import keras
from keras import ops

from keras_moe import backend as fast
from keras_moe.dispatch import blocks
from keras_moe.dispatch.grouped import STRATEGIES


def default_strategy(dtype=None):
    """How dropless dispatch runs the experts on this backend and device.

    Args:
        dtype: the compute dtype of the tokens, or `None` (any). The grouped
            matmuls chosen for GPUs and for `torch.compile` take 16-bit
            floats only (`torch._grouped_mm` on CUDA and in
            `torch.compile`'s shape checks, the Pallas kernels): for other
            dtypes the choice falls back as described below.

    See `keras_moe.dispatch.grouped` for what each strategy does. The
    environment variable `KERAS_MOE_DROPLESS_STRATEGY` (one of
    `STRATEGIES`) overrides the choice, e.g. to compare strategies in a
    benchmark.

    - `"ranges"` on CPUs with dynamic shapes: PyTorch, TensorFlow graphs
      outside XLA (a Python loop over the experts' exact row ranges).
    - `"grouped"` under `torch.compile` (`torch._grouped_mm`: no sizes read
      on the host) in bf16; `"batched"` in other dtypes.
    - `"scan"` on CPUs under XLA: JAX, TensorFlow with `jit_compile=True`
      (a compiled loop over fixed-size blocks of each expert's rows).
    - On GPUs (measured on an H200 with `T = 16384`, hidden 2048, bf16:
      `benchmarks/results/gpu_h200_*`): `"grouped"` where a fast grouped
      matmul exists — JAX on Hopper (Pallas Mosaic-GPU kernels: 1.6x the
      dense-active FFN's step at E = 8 and 2.0x at E = 64, against 4.1x and
      7.9x for keras-hub's all-experts block) and PyTorch on Hopper and
      newer (`torch._grouped_mm`: 2.9x / 4.1x); `"ranges"` on other
      PyTorch GPUs (exact per-expert matmuls: 3.4x at E = 8, the next best
      there).
    - `"batched"` elsewhere on accelerators (other GPUs under JAX or
      TensorFlow, TPUs): one batched einsum over per-block copies of the
      kernels; not measured on those devices in this form (on the H200 it
      was 8x / 12x the dense FFN, so measure before relying on it). Also
      the GPU choice for dtypes the grouped kernels don't take (float32),
      where PyTorch runs eagerly `"ranges"`.
    """
    chosen = os.environ.get("KERAS_MOE_DROPLESS_STRATEGY")
    if chosen:
        if chosen not in STRATEGIES:
            raise ValueError(
                f"KERAS_MOE_DROPLESS_STRATEGY must be one of {STRATEGIES}. Received: {chosen!r}"
            )
        return chosen
    half = dtype is None or keras.backend.standardize_dtype(dtype) in ("bfloat16", "float16")
    if fast.on_accelerator():
        strategy = _accelerator_strategy()
        if strategy == "grouped" and not half:
            return "ranges" if keras.backend.backend() == "torch" and fast.eager_shapes() else "batched"
        return strategy
    if fast.eager_shapes():
        return "ranges"
    if keras.backend.backend() == "torch":  # under torch.compile
        return "grouped" if half else "batched"
    return "ranges" if fast.has_grouped_matmul() else "scan"


def _accelerator_strategy():
    backend = keras.backend.backend()
    capability = fast.cuda_capability()
    if backend == "jax" and fast.has_pallas_grouped_matmul():
        return "grouped"
    if backend == "torch" and capability is not None:
        if capability >= (9, 0) and fast.has_grouped_matmul():
            return "grouped"
        # Exact row ranges read sizes on the host: not under torch.compile.
        return "ranges" if fast.eager_shapes() else "batched"
    return "batched"


def describe_strategy(strategy):
    """One line on what `strategy` does (for benchmark tables)."""
    return {
        "ranges": "a loop over the experts' exact row ranges, one matmul per expert and projection",
        "scan": "a compiled loop over fixed-size blocks of each expert's rows",
        "grouped": "all rows through the backend grouped matmul"
        + (" (JAX's Pallas Mosaic-GPU kernels)" if fast.has_pallas_grouped_matmul() else ""),
        "batched": "one batched einsum over per-block copies of the kernels",
    }[strategy]


def dispatch_dropless(
    x, expert_indices, expert_weights, valid, experts, training=None, strategy=None, block_size=None
):
    """Runs every valid assignment through its expert and combines.

    The assignments are laid out as per-expert rows (`blocks.plan_rows`),
    the experts run on them (`StackedExperts.call_dropless`: the tokens are
    gathered into the first projection and the weighted last projection is
    combined back into the tokens, see `keras_moe.dispatch.grouped`).

    Args:
        x: `(tokens, hidden)`.
        expert_indices: `(tokens, k)` int32; a token's `k` experts are
            distinct.
        expert_weights: `(tokens, k)` combine weights.
        valid: `(tokens, k)` bool, False for assignments that must add
            nothing (masked tokens); they are never computed, and their
            weights are never read.
        experts: a `StackedExperts`.
        training: bool, training mode (expert dropout).
        strategy: one of `STRATEGIES`, or `None` for `default_strategy()`.
        block_size: int, rows per block, or `None` for `1` with `"ranges"`
            (exact row ranges), `8` with `"grouped"` (16-byte aligned
            groups) and `block_size_for(...)` otherwise.

    Returns:
        `outputs (tokens, hidden)`.

    Examples:
        >>> import numpy as np
        >>> from keras_moe.experts import StackedExperts
        >>> experts = StackedExperts(num_experts=4, intermediate_dim=8, gated=True)
        >>> experts.build((None, 6))
        >>> x = np.random.default_rng(0).standard_normal((5, 6)).astype("float32")
        >>> indices = np.array([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2]], "int32")
        >>> weights = np.full((5, 2), 0.5, "float32")
        >>> valid = np.ones((5, 2), bool)
        >>> tuple(dispatch_dropless(x, indices, weights, valid, experts).shape)
        (5, 6)
    """
    x = ops.convert_to_tensor(x)
    strategy = strategy or default_strategy(x.dtype)
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}. Received: strategy={strategy!r}")
    if strategy == "ranges" and not getattr(experts, "exact_row_ranges", False):
        # Custom experts (`keras_moe.experts.Experts`) run rows in blocks or
        # through the grouped matmul, not as exact row ranges.
        strategy = "grouped" if fast.has_grouped_matmul() else "scan"
    if strategy == "ranges" and keras.backend.backend() == "jax":
        raise ValueError(
            "`strategy='ranges'` needs dynamic shapes (PyTorch, TensorFlow graphs); "
            "on JAX use 'scan', 'grouped' or 'batched'. Received: strategy='ranges'"
        )
    num_experts = experts.num_experts
    if block_size is None:
        num_rows = ops.shape(expert_indices)[0] * ops.shape(expert_indices)[1]
        block_size = {"ranges": 1, "grouped": 8}.get(strategy) or blocks.block_size_for(
            num_rows, num_experts
        )

    def run(experts, x, expert_indices, expert_weights, valid):
        plan = blocks.plan_rows(expert_indices, valid, num_experts, block_size)
        weights = ops.cast(blocks.row_weights(expert_weights, plan), x.dtype)  # (R,)
        return experts.call_dropless(x, plan, weights, strategy, training=training)

    args = (x, expert_indices, expert_weights, valid)
    if not training:
        # Eager JAX compiles the expert loops on every call; reuse one
        # compiled program instead (training calls may draw dropout).
        outputs = fast.eager_jit(experts, ("dispatch_dropless", strategy, block_size), run, *args)
        if outputs is not None:
            return outputs
    return run(experts, *args)
