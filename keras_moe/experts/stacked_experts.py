"""`E` experts stored as stacked kernels and run as batched contractions."""

import keras
from keras import ops

from keras_moe import backend as fast
from keras_moe.dispatch import grouped
from keras_moe.experts import activations
from keras_moe.experts.contractions import stacked_matmul
from keras_moe.experts.feed_forward import activate
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
    - `call_dropless(x, plan, row_weights, strategy)`: tokens `(T, hidden)`
      with a routing plan; every assignment computed (dropless dispatch).

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

    # `call_dropless` runs exact per-expert row ranges (see `Experts`).
    exact_row_ranges = True

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

    def _dropless_fast_path(self, x, plan, row_weights, strategy, names, kernels, hidden_mask):
        """The whole FFN per expert in one gradient (TensorFlow graphs), else `None`.

        The variables go as they are: `expert_ffn` reads them only where it
        applies (elsewhere a read would be a wasted cast under mixed precision).
        """
        down_kernel, down_bias = self._params("down")
        return fast.expert_ffn(
            x,
            kernels,
            [self._params(name)[1] for name in names],
            down_kernel,
            down_bias,
            row_weights,
            plan,
            strategy,
            activation=lambda *first: activate(first, self.activation),
            mask=hidden_mask,
            in_flight=grouped.IN_FLIGHT,
        )

    def call_dropless(self, x, plan, row_weights, strategy, training=None):
        """Experts on routed tokens, every assignment computed: `(T, d)` -> `(T, d)`.

        The first projection(s) gather the tokens into per-expert rows and the
        last one, scaled by the combine weights, sums the rows back into the
        tokens (`keras_moe.dispatch.grouped`), so that no `(R, d)` copy of the
        tokens is kept for the backward pass; the hidden activations are
        `(R, intermediate_dim)`.

        Args:
            x: `(T, d)` tokens.
            plan: a `keras_moe.dispatch.blocks.RowPlan` of the routing.
            row_weights: `(R,)` combine weight of each row.
            strategy: one of `keras_moe.dispatch.STRATEGIES`.
            training: bool, training mode (dropout).

        Returns:
            `(T, d)`: for each token the weighted sum of its experts' outputs.
        """
        rows = ops.shape(plan.row_experts)[0]
        hidden_mask = self._dropout_mask((rows, self.intermediate_dim), training)
        # The first projections share one gather of the tokens.
        names = ["up", "gate"] if self.gated else ["up"]
        kernels = [ops.convert_to_tensor(self._params(name)[0]) for name in names]
        out = self._dropless_fast_path(x, plan, row_weights, strategy, names, kernels, hidden_mask)
        if out is not None:
            return out
        first = grouped.gather_matmul(x, kernels, plan, strategy)  # [(R, h)]
        for i, name in enumerate(names):
            bias = self._params(name)[1]
            if bias is not None:
                first[i] = first[i] + ops.take(bias, plan.row_experts, axis=0)
        kernel, bias = self._params("down")
        return grouped.matmul_combine(
            first,
            row_weights,
            ops.convert_to_tensor(kernel),
            None if bias is None else ops.convert_to_tensor(bias),
            plan,
            strategy,
            activation=lambda *first: activate(first, self.activation),
            mask=hidden_mask,
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
