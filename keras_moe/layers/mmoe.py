"""Multi-gate Mixture-of-Experts (MMoE) layer."""

import keras
from keras import ops

from keras_moe.layers.multi_task_mixture import MultiTaskMixture
from keras_moe.layers.multi_task_mixture import mix
from keras_moe.layers.multi_task_mixture import softmax_gates
from keras_moe.validation import check_int


@keras.saving.register_keras_serializable(package="keras_moe")
class MMoE(MultiTaskMixture):
    """Multi-gate Mixture-of-Experts layer for multi-task learning.

    `num_experts` expert MLPs all read the layer input. Each of the
    `num_tasks` tasks has its own softmax gate, also on the layer input,
    which mixes the expert outputs into that task's representation:
    `output_t = sum_e softmax(gate_t(x))_e * expert_e(x)`. Tasks that are
    weakly related can thus draw on different experts, while related tasks
    share them. The outputs typically feed one tower MLP per task (see
    `keras_moe.models.MultiTaskModel`). With `num_tasks=1` the layer is the
    one-gate mixture (OMoE) baseline of the paper.

    All experts are computed together as one batched contraction per layer
    depth, with kernels stacked along a leading expert axis; the gates are
    batched the same way along a task axis. Every expert is initialized
    independently of the others, with the fans of its own `(in, out)` slice.

    Variables: `experts.kernel_{i}` of shape
    `(num_experts, in_i, expert_units[i])` and `experts.bias_{i}` of shape
    `(num_experts, expert_units[i])`; `gates.kernel_{i}` of shape
    `(num_tasks, in_i, width_i)` and `gates.bias_{i}`, with widths
    `gate_units + [num_experts]`.

    Args:
        num_tasks: int >= 1. Number of tasks, i.e. gates and outputs.
        num_experts: int >= 1. Number of experts shared by all tasks.
        expert_units: int or list of ints, each >= 1. Widths of the layers
            of every expert MLP; the outputs have width `expert_units[-1]`.
        gate_units: list of ints, each >= 1. Widths of the hidden layers of
            every gate MLP before its final `num_experts`-wide projection.
            Defaults to `()`, a linear gate as in the paper.
        expert_activation: activation after each expert layer, the last one
            included. Defaults to `"relu"`.
        gate_activation: activation after each hidden gate layer. Defaults to
            `"relu"`.
        use_bias: bool. Whether expert and gate layers add a bias. Defaults
            to `True`.
        dropout: float in [0, 1). Dropout rate after each expert layer, in
            training only. Defaults to `0.0`.
        kernel_initializer: initializer of each expert's and gate's kernels.
            Defaults to `"glorot_uniform"`.
        gate_initializer: initializer of each gate's last kernel, the
            projection to expert logits. Defaults to `"zeros"`: every gate
            starts as the uniform mixture of its experts and learns to
            specialize. (A random gate starts by splitting the inputs among
            the experts at random; on the MMoE synthetic experiment that
            trained markedly slower.)
        bias_initializer: initializer of the biases. Defaults to `"zeros"`.
        kernel_regularizer: optional regularizer on all kernels.
        bias_regularizer: optional regularizer on all biases.
        **kwargs: other keyword arguments of `keras.layers.Layer`, e.g.
            `name` and `dtype`.

    Call arguments:
        - `inputs`: tensor of shape `(batch, ..., features)`.
        - `training`: bool. Whether dropout is active.
        - `return_gates`: bool. If `True`, also return the gate weights.

    Returns:
        A list of `num_tasks` tensors of shape `(batch, ..., expert_units[-1])`.
        With `return_gates=True`, a tuple `(outputs, gates)` where `gates` is
        a list of `num_tasks` float32 tensors `(batch, ..., num_experts)`
        whose rows sum to 1.

    Examples:
        >>> import numpy as np
        >>> import keras
        >>> x = np.random.normal(size=(32, 100)).astype("float32")
        >>> mmoe = MMoE(num_tasks=2, num_experts=8, expert_units=16)
        >>> task_a, task_b = mmoe(x)
        >>> tuple(task_a.shape)
        (32, 16)
        >>> outputs, gates = mmoe(x, return_gates=True)
        >>> [tuple(g.shape) for g in gates]
        [(32, 8), (32, 8)]

        In a functional model, with one tower per task:

        >>> inputs = keras.Input(shape=(100,))
        >>> towers = MMoE(2, 8, [32, 16])(inputs)
        >>> outputs = [keras.layers.Dense(1)(t) for t in towers]
        >>> model = keras.Model(inputs, outputs)

    References:
        - [Ma et al., 2018. Modeling Task Relationships in Multi-task
          Learning with Multi-gate Mixture-of-Experts](https://dl.acm.org/doi/10.1145/3219819.3220007)
    """

    def __init__(
        self,
        num_tasks,
        num_experts,
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
        if kwargs.get("name") is None:
            # Keras would derive "m_mo_e" from the class name.
            uid = keras.backend.get_uid("mmoe")
            kwargs["name"] = "mmoe" if uid == 1 else f"mmoe_{uid - 1}"
        super().__init__(
            num_tasks,
            expert_units,
            gate_units=gate_units,
            expert_activation=expert_activation,
            gate_activation=gate_activation,
            use_bias=use_bias,
            dropout=dropout,
            kernel_initializer=kernel_initializer,
            gate_initializer=gate_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            **kwargs,
        )
        self.num_experts = check_int("num_experts", num_experts, 1)
        self.experts = self.expert_stack(self.num_experts)
        self.gates = self.gate_stack(self.num_tasks, self.num_experts, "gates")

    def build(self, input_shape):
        self.experts.build(input_shape)
        self.gates.build(input_shape)

    def call(self, inputs, training=None, return_gates=False):
        expert_outputs = self.experts(inputs, training=training)
        # expert_outputs: (..., num_experts, units)
        gates = softmax_gates(self.gates(inputs))  # (..., num_tasks, experts)
        mixed = mix(gates, expert_outputs, "...te,...eu->...tu")
        # mixed: (..., num_tasks, units)
        outputs = list(ops.unstack(mixed, num=self.num_tasks, axis=-2))
        if return_gates:
            return outputs, list(ops.unstack(gates, num=self.num_tasks, axis=-2))
        return outputs

    def compute_output_shape(self, input_shape):
        output_shape = tuple(input_shape[:-1]) + (self.expert_units[-1],)
        return [output_shape] * self.num_tasks

    def compute_output_spec(self, inputs, training=None, return_gates=False):
        outputs = [
            keras.KerasTensor(shape, dtype=self.compute_dtype)
            for shape in self.compute_output_shape(inputs.shape)
        ]
        if not return_gates:
            return outputs
        gate_shape = tuple(inputs.shape[:-1]) + (self.num_experts,)
        gates = [
            keras.KerasTensor(gate_shape, dtype="float32")
            for _ in range(self.num_tasks)
        ]
        return outputs, gates

    def get_config(self):
        config = super().get_config()
        config["num_experts"] = self.num_experts
        return config
