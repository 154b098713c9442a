"""The base of the dense multi-task mixtures (MMoE, CGC, PLE)."""

import keras
from keras import ops

from keras_moe.experts.stacked_mlp import StackedMLP
from keras_moe.experts.stacked_mlp import weights_config
from keras_moe.validation import check_bool
from keras_moe.validation import check_int
from keras_moe.validation import check_rate
from keras_moe.validation import check_units


def softmax_gates(logits):
    """Gate weights: a softmax over the last axis, in float32 whatever the policy."""
    return ops.softmax(ops.cast(logits, "float32"), axis=-1)


def mix(gates, expert_outputs, equation):
    """Gate-weighted sum of expert outputs, in the experts' dtype.

    Args:
        gates: float32 gate weights, as `softmax_gates` returns them.
        expert_outputs: the experts' outputs `(..., experts, units)`.
        equation: the `einsum` pairing them, e.g. `"...te,...eu->...tu"`.
    """
    return ops.einsum(equation, ops.cast(gates, expert_outputs.dtype), expert_outputs)


class MultiTaskMixture(keras.layers.Layer):
    """Base of the multi-task mixtures: the arguments MMoE, CGC and PLE share.

    A multi-task mixture runs expert MLPs and one softmax gate per task (and
    maybe more gates), all as `keras_moe.experts.StackedMLP` stacks, and
    returns one mixture of the experts per task. This class validates and
    stores the arguments every such layer has, builds its expert and gate
    stacks, and serializes those arguments; subclasses add their own
    (numbers of experts, levels) and decide which gate sees which experts.

    Args:
        num_tasks: int >= 1. Number of tasks.
        expert_units: the experts' layer widths, validated by
            `_check_expert_units` (an int or a list of ints, each >= 1).
        gate_units: list of ints, each >= 1. Hidden widths of every gate MLP
            before its final projection to expert logits. Defaults to `()`,
            a linear gate.
        expert_activation: activation after each expert layer, the last one
            included. Defaults to `"relu"`.
        gate_activation: activation after each hidden gate layer. Defaults
            to `"relu"`.
        use_bias: bool. Whether expert and gate layers add a bias. Defaults
            to `True`.
        dropout: float in `[0, 1)`. Dropout after each expert layer, in
            training only. Defaults to `0.0`.
        kernel_initializer: initializer of each expert's and gate's kernels.
            Defaults to `"glorot_uniform"`.
        gate_initializer: initializer of each gate's last kernel. Defaults
            to `"zeros"`: every gate starts as the uniform mixture.
        bias_initializer: initializer of the biases. Defaults to `"zeros"`.
        kernel_regularizer: optional regularizer on all kernels.
        bias_regularizer: optional regularizer on all biases.
        **kwargs: other keyword arguments of `keras.layers.Layer`.
    """

    def __init__(
        self,
        num_tasks,
        expert_units,
        gate_units=(),
        expert_activation="relu",
        gate_activation="relu",
        use_bias=True,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        gate_initializer="zeros",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_tasks = check_int("num_tasks", num_tasks, 1)
        self.expert_units = self._check_expert_units(expert_units)
        self.gate_units = check_units("gate_units", gate_units, allow_empty=True)
        self.expert_activation = keras.activations.get(expert_activation)
        self.gate_activation = keras.activations.get(gate_activation)
        self.use_bias = check_bool("use_bias", use_bias)
        self.dropout = check_rate("dropout", dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.gate_initializer = keras.initializers.get(gate_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)

    def _check_expert_units(self, expert_units):
        """Validates `expert_units`; a subclass may accept more forms."""
        return check_units("expert_units", expert_units)

    def _stack(self, num_stacks, units, name, stacked_inputs, gate):
        """A `StackedMLP` of experts (`gate=False`) or of gates, with the layer's arguments."""
        return StackedMLP(
            num_stacks,
            units,
            activation=self.gate_activation if gate else self.expert_activation,
            activate_output=not gate,
            stacked_inputs=stacked_inputs,
            use_bias=self.use_bias,
            dropout=0.0 if gate else self.dropout,
            kernel_initializer=self.kernel_initializer,
            output_kernel_initializer=self.gate_initializer if gate else None,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            dtype=self.dtype_policy,
            name=name,
        )

    def expert_stack(self, num_experts, name="experts", stacked_inputs=False, units=None):
        """`num_experts` expert MLPs of widths `units` (default: `expert_units`)."""
        units = self.expert_units if units is None else units
        return self._stack(num_experts, units, name, stacked_inputs, gate=False)

    def gate_stack(self, num_gates, num_experts, name, stacked_inputs=False):
        """`num_gates` gate MLPs, each giving `num_experts` expert logits."""
        units = self.gate_units + (num_experts,)
        return self._stack(num_gates, units, name, stacked_inputs, gate=True)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_tasks": self.num_tasks,
                # A list of ints, or one list per level (PLE).
                "expert_units": [
                    list(units) if isinstance(units, tuple) else units
                    for units in self.expert_units
                ],
                "gate_units": list(self.gate_units),
                "expert_activation": keras.activations.serialize(self.expert_activation),
                "gate_activation": keras.activations.serialize(self.gate_activation),
                **weights_config(self),
                "gate_initializer": keras.initializers.serialize(self.gate_initializer),
            }
        )
        return config
