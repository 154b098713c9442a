"""Customized Gate Control (CGC): task-specific plus shared experts."""

import keras
import numpy as np
from keras import ops

from keras_moe.layers.multi_task_mixture import MultiTaskMixture
from keras_moe.layers.multi_task_mixture import mix
from keras_moe.layers.multi_task_mixture import softmax_gates
from keras_moe.validation import check_bool
from keras_moe.validation import check_int


def is_shape_list(input_shape):
    """Whether `input_shape` is a list of shapes rather than one shape."""
    return (
        isinstance(input_shape, (list, tuple))
        and len(input_shape) > 0
        and isinstance(input_shape[0], (list, tuple))
    )


def check_expert_counts(num_task_experts, num_shared_experts):
    """The experts per task and shared, as ints; at least one expert in all."""
    num_task_experts = check_int("num_task_experts", num_task_experts, 0)
    num_shared_experts = check_int("num_shared_experts", num_shared_experts, 0)
    if num_task_experts + num_shared_experts < 1:
        raise ValueError(
            "`num_task_experts` + `num_shared_experts` must be >= 1, so that "
            "every task gate has an expert to choose. Received: "
            f"num_task_experts={num_task_experts}, "
            f"num_shared_experts={num_shared_experts}"
        )
    return num_task_experts, num_shared_experts


@keras.saving.register_keras_serializable(package="keras_moe")
class CGC(MultiTaskMixture):
    """Customized Gate Control layer: task-specific plus shared experts.

    Each of the `num_tasks` tasks owns `num_task_experts` expert MLPs, and
    `num_shared_experts` more are shared by all tasks. Task `t`'s softmax
    gate mixes only its own experts and the shared ones, so a task cannot be
    pulled around by another task's private experts (the "seesaw" effect
    of MMoE). This single-level layer is the CGC model of the paper and the
    building block of `keras_moe.layers.PLE`.

    With `shared_output=True` the layer also runs a shared gate over all
    experts and returns the shared representation after the task outputs;
    `PLE` uses this below its top level. The inputs are either one tensor,
    read by every expert and gate, or a list of `num_tasks + 1` tensors (the
    task representations, then the shared one, as a lower CGC with
    `shared_output=True` returns them): task `t`'s experts and gate read
    input `t`, the shared experts and the shared gate read the last input.

    Experts are ordered task by task, then the shared ones, and all of them
    are computed as one batched contraction (`keras_moe.experts.StackedMLP`).
    Task `t`'s gate weights are ordered its `num_task_experts` experts first,
    then the shared experts.

    Variables: `experts.kernel_{i}` of shape
    `(num_tasks * num_task_experts + num_shared_experts, in_i, expert_units[i])`
    and `experts.bias_{i}`; `task_gates.kernel_{i}` with `num_tasks` stacks;
    with `shared_output=True`, `shared_gate.kernel_{i}` with one stack.

    Args:
        num_tasks: int >= 1. Number of tasks.
        num_task_experts: int >= 0. Experts owned by each task.
        num_shared_experts: int >= 0. Experts shared by all tasks. At least
            one of `num_task_experts` and `num_shared_experts` must be >= 1.
        expert_units: int or list of ints, each >= 1. Widths of the layers
            of every expert MLP; the outputs have width `expert_units[-1]`.
        gate_units: list of ints, each >= 1. Hidden widths of every gate MLP
            before its final projection to expert logits. Defaults to `()`,
            a linear gate.
        expert_activation: activation after each expert layer, the last one
            included. Defaults to `"relu"`.
        gate_activation: activation after each hidden gate layer. Defaults to
            `"relu"`.
        shared_output: bool. Whether to also compute and return the shared
            representation (shared gate over all experts). Defaults to
            `False`.
        use_bias: bool. Whether expert and gate layers add a bias. Defaults
            to `True`.
        dropout: float in `[0, 1)`. Dropout rate after each expert layer, in
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
        - `inputs`: a tensor `(batch, ..., features)`, or a list of
          `num_tasks + 1` such tensors of equal shape.
        - `training`: bool. Whether dropout is active.
        - `return_gates`: bool. If `True`, also return the gate weights.

    Returns:
        A list of `num_tasks` tensors `(batch, ..., expert_units[-1])`,
        followed by the shared representation of the same shape if
        `shared_output=True`. With `return_gates=True`, a tuple
        `(outputs, gates)`: `gates` lists each task's float32 weights
        `(batch, ..., num_task_experts + num_shared_experts)`, then, if
        `shared_output=True`, the shared gate's
        `(batch, ..., num_tasks * num_task_experts + num_shared_experts)`.

    Examples:
        >>> import numpy as np
        >>> x = np.random.normal(size=(32, 100)).astype("float32")
        >>> cgc = CGC(
        ...     num_tasks=2, num_task_experts=2, num_shared_experts=2,
        ...     expert_units=16,
        ... )
        >>> task_a, task_b = cgc(x)
        >>> tuple(task_a.shape)
        (32, 16)
        >>> outputs, gates = cgc(x, return_gates=True)
        >>> [tuple(g.shape) for g in gates]  # own 2 + shared 2 experts each
        [(32, 4), (32, 4)]

        A lower CGC with `shared_output=True` feeds an upper one:

        >>> streams = CGC(2, 1, 1, 8, shared_output=True)(x)
        >>> len(streams)  # two task representations, then the shared one
        3
        >>> [tuple(o.shape) for o in CGC(2, 1, 1, 4)(streams)]
        [(32, 4), (32, 4)]

    References:
        - [Tang et al., 2020. Progressive Layered Extraction (PLE): A Novel
          Multi-Task Learning (MTL) Model for Personalized
          Recommendations](https://dl.acm.org/doi/10.1145/3383313.3412236)
    """

    def __init__(
        self,
        num_tasks,
        num_task_experts,
        num_shared_experts,
        expert_units,
        gate_units=(),
        expert_activation="relu",
        gate_activation="relu",
        shared_output=False,
        use_bias=True,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        gate_initializer="zeros",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
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
        self.num_task_experts, self.num_shared_experts = check_expert_counts(
            num_task_experts, num_shared_experts
        )
        self.shared_output = check_bool("shared_output", shared_output)

        tasks, own, shared = self.num_tasks, self.num_task_experts, self.num_shared_experts
        self.num_experts = tasks * own + shared
        # Input stream read by each expert: task t's experts read stream t,
        # the shared experts the shared stream (index num_tasks).
        self._expert_streams = np.array(
            [t for t in range(tasks) for _ in range(own)] + [tasks] * shared,
            dtype="int32",
        )
        # Experts visible to each task gate: its own, then the shared ones.
        self._task_experts = np.array(
            [
                [t * own + j for j in range(own)] + [tasks * own + j for j in range(shared)]
                for t in range(tasks)
            ],
            dtype="int32",
        )  # (num_tasks, num_task_experts + num_shared_experts)

    def build(self, input_shape):
        # Whether the inputs are one tensor or a list of streams is only
        # known here, and the stacks read them differently.
        self._stacked_inputs = is_shape_list(input_shape)
        if self._stacked_inputs:
            if len(input_shape) != self.num_tasks + 1:
                raise ValueError(
                    "A list input must hold `num_tasks + 1` = "
                    f"{self.num_tasks + 1} tensors (one per task, then the "
                    f"shared one). Received {len(input_shape)} shapes: "
                    f"{input_shape}"
                )
            stream_shape = tuple(input_shape[-1])
            if any(tuple(s)[-1] != stream_shape[-1] for s in input_shape):
                raise ValueError(
                    "All inputs of a list input must have the same last "
                    f"dimension. Received shapes: {input_shape}"
                )
        else:
            stream_shape = tuple(input_shape)
        batch_shape, features = stream_shape[:-1], stream_shape[-1]

        visible = self.num_task_experts + self.num_shared_experts
        self.experts = self.expert_stack(self.num_experts, stacked_inputs=self._stacked_inputs)
        self.task_gates = self.gate_stack(
            self.num_tasks, visible, "task_gates", stacked_inputs=self._stacked_inputs
        )
        if self._stacked_inputs:
            self.experts.build(batch_shape + (self.num_experts, features))
            self.task_gates.build(batch_shape + (self.num_tasks, features))
        else:
            self.experts.build(stream_shape)
            self.task_gates.build(stream_shape)
        if self.shared_output:
            self.shared_gate = self.gate_stack(1, self.num_experts, "shared_gate")
            self.shared_gate.build(stream_shape)

    def call(self, inputs, training=None, return_gates=False):
        if self._stacked_inputs:
            inputs = list(inputs)
            streams = ops.stack(inputs, axis=-2)  # (..., num_tasks + 1, d)
            expert_inputs = ops.take(streams, self._expert_streams, axis=-2)
            # expert_inputs: (..., num_experts, d)
            task_inputs = streams[..., : self.num_tasks, :]
            shared_input = inputs[-1]
        else:
            expert_inputs = task_inputs = shared_input = inputs

        expert_outputs = self.experts(expert_inputs, training=training)
        # expert_outputs: (..., num_experts, units)
        task_gates = softmax_gates(self.task_gates(task_inputs))
        # task_gates: (..., num_tasks, num_task_experts + num_shared_experts)
        visible = ops.take(expert_outputs, self._task_experts, axis=-2)
        # visible: (..., num_tasks, num_task_experts + num_shared_experts, units)
        mixed = mix(task_gates, visible, "...tk,...tku->...tu")  # (..., num_tasks, units)
        outputs = list(ops.unstack(mixed, num=self.num_tasks, axis=-2))
        gates = list(ops.unstack(task_gates, num=self.num_tasks, axis=-2))

        if self.shared_output:
            shared_gate = softmax_gates(
                ops.squeeze(self.shared_gate(shared_input), axis=-2)
            )  # (..., num_experts)
            outputs.append(mix(shared_gate, expert_outputs, "...e,...eu->...u"))
            gates.append(shared_gate)
        if return_gates:
            return outputs, gates
        return outputs

    def compute_output_shape(self, input_shape):
        if is_shape_list(input_shape):
            input_shape = input_shape[-1]
        output_shape = tuple(input_shape[:-1]) + (self.expert_units[-1],)
        return [output_shape] * (self.num_tasks + int(self.shared_output))

    def compute_output_spec(self, inputs, training=None, return_gates=False):
        input_shape = (
            [x.shape for x in inputs] if isinstance(inputs, (list, tuple)) else inputs.shape
        )
        outputs = [
            keras.KerasTensor(shape, dtype=self.compute_dtype)
            for shape in self.compute_output_shape(input_shape)
        ]
        if not return_gates:
            return outputs
        batch_shape = tuple(outputs[0].shape[:-1])
        visible = self.num_task_experts + self.num_shared_experts
        gates = [
            keras.KerasTensor(batch_shape + (visible,), dtype="float32")
            for _ in range(self.num_tasks)
        ]
        if self.shared_output:
            gates.append(keras.KerasTensor(batch_shape + (self.num_experts,), dtype="float32"))
        return outputs, gates

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_task_experts": self.num_task_experts,
                "num_shared_experts": self.num_shared_experts,
                "shared_output": self.shared_output,
            }
        )
        return config
