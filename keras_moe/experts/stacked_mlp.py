"""Many small MLPs of equal widths, run side by side as batched matmuls."""

import keras

from keras_moe.experts.contractions import shared_input_matmul
from keras_moe.experts.contractions import stacked_matmul
from keras_moe.experts.initializers import StackedInitializer
from keras_moe.validation import check_bool
from keras_moe.validation import check_int
from keras_moe.validation import check_rate
from keras_moe.validation import check_units


def weights_config(layer):
    """Config entries of a layer's bias, dropout, initializers and regularizers.

    Shared by `StackedMLP` and the multi-task mixtures, which hold these
    arguments under the same attribute names.
    """
    return {
        "use_bias": layer.use_bias,
        "dropout": layer.dropout,
        "kernel_initializer": keras.initializers.serialize(layer.kernel_initializer),
        "bias_initializer": keras.initializers.serialize(layer.bias_initializer),
        "kernel_regularizer": keras.regularizers.serialize(layer.kernel_regularizer),
        "bias_regularizer": keras.regularizers.serialize(layer.bias_regularizer),
    }


@keras.saving.register_keras_serializable(package="keras_moe")
class StackedMLP(keras.layers.Layer):
    """`num_stacks` independent MLPs of equal widths, run as batched matmuls.

    Every MLP has the layers `units[0], units[1], ...`, each followed by
    `activation` (the last one too unless `activate_output=False`). Depth `i`
    holds one kernel of shape `(num_stacks, in_i, units[i])` and one bias
    `(num_stacks, units[i])`, so all the MLPs advance together in a single
    contraction per depth instead of a Python loop over `Dense` layers. This
    is the expert type of the dense multi-task mixtures
    (`keras_moe.layers.MMoE`, `CGC`, `PLE`: one stack per expert), which also
    run their gates with it (one stack per task, `activate_output=False` so
    that the last layer gives logits).

    The inputs either go to every MLP (`(..., in)`) or give each MLP its own
    slice (`stacked_inputs=True`, `(..., num_stacks, in)`, as CGC's task
    experts read their task's representation). Every stack is initialized
    independently with the fans of its own `(in, out)` slice (see
    `keras_moe.experts.StackedInitializer`).

    Variables: `kernel_{i}` of shape `(num_stacks, in_i, units[i])` and, with
    `use_bias=True`, `bias_{i}` of shape `(num_stacks, units[i])`.

    Args:
        num_stacks: int >= 1. Number of independent MLPs.
        units: int or list of ints, each >= 1. Widths of the layers of every
            MLP.
        activation: activation after each layer. Defaults to `"relu"`.
        activate_output: bool. Whether `activation` (and dropout) also follow
            the last layer. Defaults to `True`.
        stacked_inputs: bool. If `False`, inputs `(..., in)` go to every MLP.
            If `True`, inputs are `(..., num_stacks, in)`, one slice per MLP.
            Defaults to `False`.
        use_bias: bool. Whether the layers add a bias. Defaults to `True`.
        dropout: float in `[0, 1)`. Dropout after each activated layer, in
            training only. Defaults to `0.0`.
        kernel_initializer: initializer of each `(in, out)` kernel slice.
            Defaults to `"glorot_uniform"`.
        output_kernel_initializer: initializer of the last layer's kernel
            slices. Defaults to `None`, which uses `kernel_initializer`.
        bias_initializer: initializer of each bias slice. Defaults to
            `"zeros"`.
        kernel_regularizer: optional regularizer on the stacked kernels.
        bias_regularizer: optional regularizer on the stacked biases.
        **kwargs: other keyword arguments of `keras.layers.Layer`, e.g.
            `name` and `dtype`.

    Call arguments:
        inputs: `(..., in)`, or `(..., num_stacks, in)` with
            `stacked_inputs=True`.
        training: bool. Whether dropout is active.

    Returns:
        A tensor `(..., num_stacks, units[-1])`: slice `s` is MLP `s`'s output.

    Examples:
        >>> import numpy as np
        >>> mlps = StackedMLP(num_stacks=4, units=[16, 8])
        >>> tuple(mlps(np.zeros((32, 10), "float32")).shape)
        (32, 4, 8)

        One input slice per MLP, e.g. one per task:

        >>> per_task = StackedMLP(3, 8, stacked_inputs=True)
        >>> tuple(per_task(np.zeros((32, 3, 10), "float32")).shape)
        (32, 3, 8)
        >>> sorted(w.path.split("/")[-1] for w in per_task.weights)
        ['bias_0', 'kernel_0']
    """

    def __init__(
        self,
        num_stacks,
        units,
        activation="relu",
        activate_output=True,
        stacked_inputs=False,
        use_bias=True,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        output_kernel_initializer=None,
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_stacks = check_int("num_stacks", num_stacks, 1)
        self.units = check_units("units", units)
        self.activation = keras.activations.get(activation)
        self.activate_output = check_bool("activate_output", activate_output)
        self.stacked_inputs = check_bool("stacked_inputs", stacked_inputs)
        self.use_bias = check_bool("use_bias", use_bias)
        self.dropout = check_rate("dropout", dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.output_kernel_initializer = (
            None
            if output_kernel_initializer is None
            else keras.initializers.get(output_kernel_initializer)
        )
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self._dropout_layer = (
            keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
            if self.dropout > 0
            else None
        )

    def _initializer(self, base, variable_name):
        return StackedInitializer(base, salt=f"{self.name}/{variable_name}")

    def build(self, input_shape):
        in_dim = input_shape[-1]
        if in_dim is None:
            raise ValueError(
                "The last dimension of the inputs must be defined. "
                f"Received: input_shape={input_shape}"
            )
        if self.stacked_inputs and (
            len(input_shape) < 2 or input_shape[-2] not in (None, self.num_stacks)
        ):
            raise ValueError(
                f"Stacked inputs must have {self.num_stacks} slices on axis "
                f"-2. Received: input_shape={input_shape}"
            )
        # Variables are created kernel_0, bias_0, kernel_1, ...: saved models
        # store them in this order.
        self.kernels = []
        self.biases = []
        last = len(self.units) - 1
        for i, units in enumerate(self.units):
            kernel_initializer = self.kernel_initializer
            if i == last and self.output_kernel_initializer is not None:
                kernel_initializer = self.output_kernel_initializer
            self.kernels.append(
                self.add_weight(
                    name=f"kernel_{i}",
                    shape=(self.num_stacks, in_dim, units),
                    initializer=self._initializer(kernel_initializer, f"kernel_{i}"),
                    regularizer=self.kernel_regularizer,
                )
            )
            if self.use_bias:
                self.biases.append(
                    self.add_weight(
                        name=f"bias_{i}",
                        shape=(self.num_stacks, units),
                        initializer=self._initializer(self.bias_initializer, f"bias_{i}"),
                        regularizer=self.bias_regularizer,
                    )
                )
            in_dim = units
        if self._dropout_layer is not None:
            self._dropout_layer.build(None)

    def call(self, inputs, training=None):
        hidden = inputs
        last = len(self.units) - 1
        for i, kernel in enumerate(self.kernels):
            if i == 0 and not self.stacked_inputs:
                hidden = shared_input_matmul(hidden, kernel)
            else:
                hidden = stacked_matmul(hidden, kernel, axis=-2)
            # hidden: (..., num_stacks, units[i])
            if self.use_bias:
                hidden = hidden + self.biases[i]
            if i < last or self.activate_output:
                hidden = self.activation(hidden)
                if self._dropout_layer is not None:
                    hidden = self._dropout_layer(hidden, training=training)
        return hidden

    def compute_output_shape(self, input_shape):
        batch_shape = input_shape[:-2] if self.stacked_inputs else input_shape[:-1]
        return tuple(batch_shape) + (self.num_stacks, self.units[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_stacks": self.num_stacks,
                "units": list(self.units),
                "activation": keras.activations.serialize(self.activation),
                "activate_output": self.activate_output,
                "stacked_inputs": self.stacked_inputs,
                **weights_config(self),
                "output_kernel_initializer": (
                    None
                    if self.output_kernel_initializer is None
                    else keras.initializers.serialize(self.output_kernel_initializer)
                ),
            }
        )
        return config
