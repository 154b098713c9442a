"""`E` experts stored as stacked kernels and run as batched contractions."""

import keras
from keras import ops

from keras_moe import backend as fast
from keras_moe.experts import activations
from keras_moe.experts.contractions import stacked_matmul
from keras_moe.experts.feed_forward import feed_forward
from keras_moe.experts.initializers import StackedInitializer
from keras_moe.validation import check_bool
from keras_moe.validation import check_int
from keras_moe.validation import check_rate


@keras.saving.register_keras_serializable(package="keras_moe")
class StackedExperts(keras.layers.Layer):
    """`num_experts` feed-forward experts with stacked `(E, ...)` kernels.

    Expert `e` computes `down(act(x @ up[e] + up_bias[e])) + down_bias[e]`,
    or with `gated=True`
    `down(act(x @ gate[e] + gate_bias[e]) * (x @ up[e] + up_bias[e])) + down_bias[e]`.
    The experts know nothing of routing; they accept tokens in the three
    layouts the dispatchers produce:

    - `call(x)`: a capacity buffer `(..., E, C, hidden)`, one batched matmul.
    - `call_blocks(x_blocks, block_experts)`: `(blocks, B, hidden)` blocks of
      rows of one expert each (dropless, portable).
    - `call_grouped(x_sorted, row_experts, group_sizes)`: rows sorted by
      expert, through a backend grouped matmul (dropless, fast path).

    Args:
        num_experts: int >= 1.
        intermediate_dim: int >= 1, each expert's hidden width.
        activation: activation name or callable, or a gated activation
            (`keras_moe.experts.ClampedSwiGLU`, `"clamped_swiglu"`; needs
            `gated=True`). Defaults to `"gelu"`.
        gated: bool, gated linear unit experts. Defaults to `False`.
        use_bias: bool, add biases. Defaults to `False`.
        dropout: float in `[0, 1)`, dropout on the expert hidden activations
            in training ("expert dropout"). Defaults to `0.0`.
        kernel_initializer: per-expert kernel initializer; each expert is
            initialized on its own (see `StackedInitializer`).
        bias_initializer: bias initializer. Defaults to `"zeros"`.
        seed: optional int seed of the dropout noise.

    Examples:
        >>> import numpy as np
        >>> experts = StackedExperts(num_experts=4, intermediate_dim=32)
        >>> tuple(experts(np.zeros((4, 3, 16), "float32")).shape)
        (4, 3, 16)
        """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        activation="gelu",
        gated=False,
        use_bias=False,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, 1)
        self.intermediate_dim = check_int("intermediate_dim", intermediate_dim, 1)
        self.gated = check_bool("gated", gated)
        self.activation = activations.check_gated_activation(
            activations.get(activation), self.gated
        )
        self.use_bias = check_bool("use_bias", use_bias)
        self.dropout = check_rate("dropout", dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        hidden = input_shape[-1]
        E, width = self.num_experts, self.intermediate_dim
        def init(name):
            return StackedInitializer(self.kernel_initializer, salt=f"{self.name}/{name}")

        self.up_kernel = self.add_weight(
            name="up_kernel", shape=(E, hidden, width), initializer=init("up_kernel")
        )
        self.gate_kernel = None
        if self.gated:
            self.gate_kernel = self.add_weight(
                name="gate_kernel", shape=(E, hidden, width), initializer=init("gate_kernel")
            )
        self.down_kernel = self.add_weight(
            name="down_kernel", shape=(E, width, hidden), initializer=init("down_kernel")
        )
        self.up_bias = self.gate_bias = self.down_bias = None
        if self.use_bias:
            self.up_bias = self.add_weight(
                name="up_bias", shape=(E, width), initializer=self.bias_initializer
            )
            if self.gated:
                self.gate_bias = self.add_weight(
                    name="gate_bias", shape=(E, width), initializer=self.bias_initializer
                )
            self.down_bias = self.add_weight(
                name="down_bias", shape=(E, hidden), initializer=self.bias_initializer
            )

    def _params(self, name):
        kernel = {"up": self.up_kernel, "gate": self.gate_kernel, "down": self.down_kernel}
        bias = {"up": self.up_bias, "gate": self.gate_bias, "down": self.down_bias}
        return kernel[name], bias[name]

    def _dropout_mask(self, shape, training):
        """Scaled keep-mask for the hidden activations, or None."""
        if not training or self.dropout <= 0:
            return None
        keep = keras.random.uniform(shape, seed=self.seed_generator) >= self.dropout
        return ops.cast(keep, self.compute_dtype) / (1.0 - self.dropout)

    def _run(self, x, matmul, add_bias, hidden_mask):
        """The FFN with layout-specific `matmul(t, kernel)`, `add_bias(t, bias)`."""

        def project(t, name):
            if name == "down" and hidden_mask is not None:
                t = t * hidden_mask
            kernel, bias = self._params(name)
            y = matmul(t, kernel)
            return y if bias is None else add_bias(y, bias)

        return feed_forward(x, project, self.activation, self.gated)

    def call(self, inputs, training=None):
        """Experts on a capacity buffer `(..., E, C, hidden)`."""
        hidden_shape = tuple(ops.shape(inputs)[:-1]) + (self.intermediate_dim,)
        return self._run(
            inputs,
            stacked_matmul,
            lambda y, bias: y + ops.expand_dims(bias, -2),
            self._dropout_mask(hidden_shape, training),
        )

    def call_blocks(self, x_blocks, block_experts, training=None, gather_weights=False):
        """Experts on `(blocks, B, hidden)`, block `n` all of `block_experts[n]`.

        By default a loop (`ops.map`) over blocks: each step slices its expert's kernels
        in place, so no `(blocks, hidden, width)` copy of the weights is made
        (best on CPUs). With `gather_weights=True`, one batched einsum over
        per-block copies of the kernels instead: more memory, one kernel
        launch (best on accelerators).
        """
        blocks, block_size = ops.shape(x_blocks)[0], ops.shape(x_blocks)[1]
        mask = self._dropout_mask((blocks, block_size, self.intermediate_dim), training)
        if gather_weights:
            return self._run(
                x_blocks,
                lambda t, kernel: ops.einsum(
                    "nbd,ndh->nbh", t, ops.take(kernel, block_experts, axis=0)
                ),
                lambda y, bias: y + ops.expand_dims(ops.take(bias, block_experts, axis=0), 1),
                mask,
            )
        xs = (x_blocks, block_experts) if mask is None else (x_blocks, block_experts, mask)

        def step(inputs):
            x, expert = inputs[0], inputs[1]
            return self._run(
                x,
                lambda t, kernel: ops.matmul(t, ops.take(kernel, expert, axis=0)),
                lambda y, bias: y + ops.take(bias, expert, axis=0),
                inputs[2] if len(inputs) > 2 else None,
            )

        # `ops.map`, not `ops.scan`: TensorFlow cannot differentiate its scan
        # under XLA ("fixed tensor list size"); its map compiles.
        return ops.map(fast.keep_only_matmuls(step), xs)

    def call_grouped(self, x_sorted, row_experts, group_sizes, training=None):
        """Experts on rows `(N, hidden)` sorted by expert (fast path only)."""
        rows = ops.shape(x_sorted)[0]
        expert_of_row = ops.minimum(row_experts, self.num_experts - 1)
        return self._run(
            x_sorted,
            lambda t, kernel: fast.grouped_matmul(
                t, ops.convert_to_tensor(kernel), group_sizes
            ),
            lambda y, bias: y + ops.take(bias, expert_of_row, axis=0),
            self._dropout_mask((rows, self.intermediate_dim), training),
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "intermediate_dim": self.intermediate_dim,
                "activation": keras.activations.serialize(self.activation),
                "gated": self.gated,
                "use_bias": self.use_bias,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "seed": self.seed,
            }
        )
        return config
