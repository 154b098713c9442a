"""The expert protocol, and a base class that implements it from one formula.

What `keras_moe.layers.MoE` needs from its `experts`:

- `num_experts`: int, equal to the router's.
- `call(buffer, training=None)`: expert `e` applied to `buffer[..., e, :, :]`
  for a capacity buffer `(..., E, C, hidden)`, returning `(..., E, C, out)`
  with `out == hidden` (the layer adds the result to a residual stream).
  This is all capacity dispatch and router-named slots (Expert Choice) use.
- Dropless dispatch (no capacity factor) also needs the experts on the
  routed tokens without padding them to a capacity: `call_dropless(x, plan,
  row_weights, strategy, training=None)` maps the tokens `x (T, hidden)` to
  `(T, hidden)`, each token the sum of its experts' outputs scaled by
  `row_weights (R,)`, following a `keras_moe.dispatch.RowPlan` (the
  assignments as `R` rows sorted by expert, in blocks of `B` rows of one
  expert). `StackedExperts` fuses the data moves into its matmuls there.

`Experts` below derives these from one method, `expert_call(x, layout,
training)`, the experts' formula written with `layout.linear(t, kernel,
bias)` for every per-expert linear map and `layout.param(p)` for any other
per-expert parameter. A layer that only has `call` works with capacity
dispatch and Expert Choice; `MoE` refuses it in dropless mode with an error
rather than computing every expert on every token.
"""

import keras
from keras import ops

from keras_moe import backend as fast
from keras_moe.experts.contractions import stacked_matmul
from keras_moe.validation import check_int


def _features(p):
    """A stacked parameter `(E, ...)` as `(E, features...)`: `(E,)` becomes `(E, 1)`."""
    p = ops.convert_to_tensor(p)
    return ops.expand_dims(p, -1) if len(p.shape) == 1 else p


class _BufferLayout:
    """Capacity buffers `(..., E, C, d)`: one batched matmul per kernel."""

    def linear(self, t, kernel, bias=None):
        y = stacked_matmul(t, ops.convert_to_tensor(kernel))
        return y if bias is None else y + self.param(bias)

    def param(self, p):
        return ops.expand_dims(_features(p), 1)  # (E, 1, ...) broadcasts over C


class _BlockLayout:
    """One `(B, d)` block of expert `expert` (a step of a loop over blocks)."""

    def __init__(self, expert):
        self.expert = expert

    def linear(self, t, kernel, bias=None):
        y = ops.matmul(t, ops.take(kernel, self.expert, axis=0))
        return y if bias is None else y + self.param(bias)

    def param(self, p):
        return ops.take(_features(p), self.expert, axis=0)


class _GatheredBlocksLayout:
    """All `(blocks, B, d)` blocks at once, each with a copy of its kernels."""

    def __init__(self, block_experts):
        self.block_experts = block_experts

    def linear(self, t, kernel, bias=None):
        y = ops.einsum("nbd,ndh->nbh", t, ops.take(kernel, self.block_experts, axis=0))
        return y if bias is None else y + self.param(bias)

    def param(self, p):
        return ops.expand_dims(ops.take(_features(p), self.block_experts, axis=0), 1)


class _GroupedLayout:
    """Rows `(N, d)` sorted by expert, through the backend grouped matmul."""

    def __init__(self, row_experts, group_sizes, num_experts):
        self.row_experts = ops.minimum(row_experts, num_experts - 1)
        self.group_sizes = group_sizes

    def linear(self, t, kernel, bias=None):
        y = fast.grouped_matmul(t, ops.convert_to_tensor(kernel), self.group_sizes)
        return y if bias is None else y + self.param(bias)

    def param(self, p):
        return ops.take(_features(p), self.row_experts, axis=0)


class Experts(keras.layers.Layer):
    # Dropless dispatch gives `call_dropless` exact per-expert row ranges
    # (block size 1, the `"ranges"` strategy) only where this is True; the
    # base class runs rows in blocks or through a grouped matmul, which
    # needs groups of a multiple of 8 rows.
    exact_row_ranges = False

    """Base class of custom stacked experts: write the formula once.

    A subclass stores `E` experts as stacked variables with a leading expert
    axis, created in `build` (e.g. `(E, hidden, width)` kernels), and writes
    the experts' computation once, in `expert_call(x, layout, training)`,
    applying every per-expert linear map with `layout.linear(t, kernel,
    bias=None)` and reading any other per-expert parameter `(E, ...)` with
    `layout.param(p)`. Element-wise operations (activations, dropout) are
    written as usual. The base class then runs the formula in each layout
    the dispatchers use (see the module docstring): capacity buffers
    `(..., E, C, hidden)` (`call`) and the dropless rows (`call_dropless`,
    through per-expert blocks, `call_blocks`, or sorted rows and the backend
    grouped matmul, `call_grouped`), so the subclass works with every
    `keras_moe.layers.MoE` mode, dropless included, and only the chosen
    experts are ever computed.

    Args:
        num_experts: int >= 1, the number of experts `E`.
        **kwargs: standard layer arguments.

    Examples:
        >>> import keras
        >>> import numpy as np
        >>> from keras import ops
        >>> class ScaledLinearExperts(Experts):
        ...     def build(self, input_shape):
        ...         d = input_shape[-1]
        ...         self.kernel = self.add_weight(shape=(self.num_experts, d, d), name="kernel")
        ...         self.gain = self.add_weight(shape=(self.num_experts, d), initializer="ones",
        ...                                     name="gain")
        ...     def expert_call(self, x, layout, training=None):
        ...         return ops.tanh(layout.linear(x, self.kernel)) * layout.param(self.gain)
        >>> experts = ScaledLinearExperts(num_experts=4)
        >>> tuple(experts(np.zeros((2, 4, 3, 8), "float32")).shape)
        (2, 4, 3, 8)
    """

    def __init__(self, num_experts, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, 1)

    def expert_call(self, x, layout, training=None):
        """The experts' formula; the one method a subclass must write.

        Args:
            x: tokens in the layout's shape, features last.
            layout: gives `layout.linear(t, kernel, bias=None)`, which applies
                each row's expert slice of a stacked `kernel (E, d_in,
                d_out)` (and `bias (E, d_out)`), and `layout.param(p)`, a
                stacked parameter `(E, ...)` arranged to broadcast against
                the rows.
            training: bool, training mode.

        Returns:
            The outputs, `x`'s shape with the last axis the output width.
        """
        raise NotImplementedError

    def call(self, inputs, training=None):
        """Experts on a capacity buffer `(..., E, C, hidden)`."""
        return self.expert_call(inputs, _BufferLayout(), training=training)

    def call_blocks(self, x_blocks, block_experts, training=None, gather_weights=False):
        """Experts on `(blocks, B, hidden)`, block `n` all of `block_experts[n]`.

        A loop over blocks slicing each block's kernels in place, or with
        `gather_weights=True` one pass over per-block copies of the kernels.
        """
        if gather_weights:
            return self.expert_call(
                x_blocks, _GatheredBlocksLayout(block_experts), training=training
            )

        def step(inputs):
            x, expert = inputs
            return self.expert_call(x, _BlockLayout(expert), training=training)

        return ops.map(fast.keep_only_matmuls(step), (x_blocks, block_experts))

    def call_grouped(self, x_sorted, row_experts, group_sizes, training=None):
        """Experts on rows `(N, hidden)` sorted by expert (grouped-matmul fast path)."""
        layout = _GroupedLayout(row_experts, group_sizes, self.num_experts)
        return self.expert_call(x_sorted, layout, training=training)

    def call_dropless(self, x, plan, row_weights, strategy, training=None):
        """Experts on routed tokens, every assignment computed: `(T, d)` -> `(T, d)`.

        The tokens are gathered into the plan's rows (`gather_rows`), the
        formula runs on them per block of one expert (`call_blocks`; with
        the `"batched"` strategy over per-block copies of the kernels) or,
        with the `"grouped"` strategy, on all rows at once through the
        backend grouped matmul (`call_grouped`; dispatch runs these experts
        with `"grouped"` where it would run `StackedExperts` with exact
        row ranges), and each token sums its rows scaled by
        `row_weights` (`combine_rows`). Padding rows are computed on zeros
        and never read.

        Args:
            x: `(T, d)` tokens.
            plan: a `keras_moe.dispatch.RowPlan` of the routing.
            row_weights: `(R,)` combine weight of each row.
            strategy: one of `keras_moe.dispatch.STRATEGIES`.
            training: bool, training mode.

        Returns:
            `(T, d)`.
        """
        from keras_moe.dispatch import blocks  # dispatch imports the experts package

        rows = blocks.gather_rows(x, plan)  # (R, d)
        if strategy == "grouped":
            y = self.call_grouped(rows, plan.row_experts, plan.group_sizes, training=training)
        else:
            block_size = plan.block_size
            x_blocks = ops.reshape(rows, (-1, block_size, ops.shape(rows)[-1]))
            y = self.call_blocks(
                x_blocks, plan.block_experts, training=training,
                gather_weights=strategy == "batched",
            )
            y = ops.reshape(y, (-1, ops.shape(y)[-1]))  # (R, d)
        y = y * ops.expand_dims(ops.cast(row_weights, y.dtype), -1)
        return blocks.combine_rows(y, plan)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"num_experts": self.num_experts})
        return config
