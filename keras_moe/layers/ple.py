"""Customized Gate Control (CGC) and Progressive Layered Extraction (PLE)."""

import keras
import numpy as np
from keras import ops

from keras_moe.layers._multitask_experts import StackedMLP
from keras_moe.experts.initializers import reseeded
from keras_moe.layers._multitask_experts import softmax_gates
from keras_moe.layers._multitask_experts import weights_config
from keras_moe.validation import check_int
from keras_moe.validation import check_rate
from keras_moe.validation import check_units


def _is_shape_list(input_shape):
    """Whether `input_shape` is a list of shapes rather than one shape."""
    return (
        isinstance(input_shape, (list, tuple))
        and len(input_shape) > 0
        and isinstance(input_shape[0], (list, tuple))
    )


def _validate_expert_counts(num_task_experts, num_shared_experts):
    num_task_experts = check_int("num_task_experts", num_task_experts, 0)
    num_shared_experts = check_int(
        "num_shared_experts", num_shared_experts, 0
    )
    if num_task_experts + num_shared_experts < 1:
        raise ValueError(
            "`num_task_experts` + `num_shared_experts` must be >= 1, so that "
            "every task gate has an expert to choose. Received: "
            f"num_task_experts={num_task_experts}, "
            f"num_shared_experts={num_shared_experts}"
        )
    return num_task_experts, num_shared_experts


@keras.saving.register_keras_serializable(package="keras_moe")
class CGC(keras.layers.Layer):
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
    are computed as one batched contraction. Task `t`'s gate weights are
    ordered its `num_task_experts` experts first, then the shared experts.

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
        **kwargs: other keyword arguments of `keras.layers.Layer`.

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

    Example:

    ```python
    import numpy as np
    import keras_moe

    x = np.random.normal(size=(32, 100)).astype("float32")
    cgc = keras_moe.layers.CGC(
        num_tasks=2, num_task_experts=2, num_shared_experts=2,
        expert_units=16,
    )
    task_a, task_b = cgc(x)  # two (32, 16) tensors
    outputs, gates = cgc(x, return_gates=True)  # gates: two (32, 4)
    ```

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
        super().__init__(**kwargs)
        self.num_tasks = check_int("num_tasks", num_tasks, 1)
        self.num_task_experts, self.num_shared_experts = (
            _validate_expert_counts(num_task_experts, num_shared_experts)
        )
        self.expert_units = check_units("expert_units", expert_units)
        self.gate_units = check_units(
            "gate_units", gate_units, allow_empty=True
        )
        self.expert_activation = keras.activations.get(expert_activation)
        self.gate_activation = keras.activations.get(gate_activation)
        self.shared_output = bool(shared_output)
        self.use_bias = bool(use_bias)
        self.dropout = check_rate("dropout", dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.gate_initializer = keras.initializers.get(gate_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)

        tasks, own, shared = (
            self.num_tasks,
            self.num_task_experts,
            self.num_shared_experts,
        )
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
                [t * own + j for j in range(own)]
                + [tasks * own + j for j in range(shared)]
                for t in range(tasks)
            ],
            dtype="int32",
        )  # (num_tasks, num_task_experts + num_shared_experts)

    def _stacked_mlp(self, num_stacks, units, stacked_inputs, name, is_gate):
        return StackedMLP(
            num_stacks,
            units,
            activation=self.gate_activation if is_gate else self.expert_activation,
            activate_output=not is_gate,
            stacked_inputs=stacked_inputs,
            use_bias=self.use_bias,
            dropout=0.0 if is_gate else self.dropout,
            kernel_initializer=self.kernel_initializer,
            output_kernel_initializer=self.gate_initializer if is_gate else None,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, input_shape):
        self._stacked_inputs = _is_shape_list(input_shape)
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

        self.experts = self._stacked_mlp(
            self.num_experts,
            self.expert_units,
            self._stacked_inputs,
            "experts",
            is_gate=False,
        )
        self.task_gates = self._stacked_mlp(
            self.num_tasks,
            self.gate_units
            + (self.num_task_experts + self.num_shared_experts,),
            self._stacked_inputs,
            "task_gates",
            is_gate=True,
        )
        if self._stacked_inputs:
            self.experts.build(batch_shape + (self.num_experts, features))
            self.task_gates.build(batch_shape + (self.num_tasks, features))
        else:
            self.experts.build(stream_shape)
            self.task_gates.build(stream_shape)
        if self.shared_output:
            self.shared_gate = self._stacked_mlp(
                1,
                self.gate_units + (self.num_experts,),
                False,
                "shared_gate",
                is_gate=True,
            )
            self.shared_gate.build(stream_shape)

    def call(self, inputs, training=None, return_gates=False):
        if self._stacked_inputs:
            inputs = list(inputs)
            streams = ops.stack(inputs, axis=-2)  # (..., num_tasks + 1, d)
            expert_inputs = ops.take(
                streams, self._expert_streams, axis=-2
            )  # (..., num_experts, d)
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
        mixed = ops.einsum(
            "...tk,...tku->...tu",
            ops.cast(task_gates, expert_outputs.dtype),
            visible,
        )  # (..., num_tasks, units)
        outputs = list(ops.unstack(mixed, num=self.num_tasks, axis=-2))
        gates = list(ops.unstack(task_gates, num=self.num_tasks, axis=-2))

        if self.shared_output:
            shared_gate = softmax_gates(
                ops.squeeze(self.shared_gate(shared_input), axis=-2)
            )  # (..., num_experts)
            outputs.append(
                ops.einsum(
                    "...e,...eu->...u",
                    ops.cast(shared_gate, expert_outputs.dtype),
                    expert_outputs,
                )
            )
            gates.append(shared_gate)
        if return_gates:
            return outputs, gates
        return outputs

    def compute_output_shape(self, input_shape):
        if _is_shape_list(input_shape):
            input_shape = input_shape[-1]
        output_shape = tuple(input_shape[:-1]) + (self.expert_units[-1],)
        return [output_shape] * (self.num_tasks + int(self.shared_output))

    def compute_output_spec(self, inputs, training=None, return_gates=False):
        input_shape = (
            [x.shape for x in inputs]
            if isinstance(inputs, (list, tuple))
            else inputs.shape
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
            gates.append(
                keras.KerasTensor(
                    batch_shape + (self.num_experts,), dtype="float32"
                )
            )
        return outputs, gates

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_tasks": self.num_tasks,
                "num_task_experts": self.num_task_experts,
                "num_shared_experts": self.num_shared_experts,
                "expert_units": list(self.expert_units),
                "gate_units": list(self.gate_units),
                "expert_activation": keras.activations.serialize(
                    self.expert_activation
                ),
                "gate_activation": keras.activations.serialize(
                    self.gate_activation
                ),
                "shared_output": self.shared_output,
                **weights_config(self),
                "gate_initializer": keras.initializers.serialize(
                    self.gate_initializer
                ),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class PLE(keras.layers.Layer):
    """Progressive Layered Extraction: stacked CGC levels for multi-task learning.

    `num_levels` `keras_moe.layers.CGC` levels are stacked. At every level,
    each task has `num_task_experts` experts of its own and
    `num_shared_experts` experts are shared; task `t`'s gate mixes its own
    and the shared experts into task `t`'s representation. Below the top
    level a shared gate over all experts also builds a shared
    representation. The next level's task-`t` experts and gate read task
    `t`'s representation and its shared experts and shared gate read the
    shared one, so task-specific and shared knowledge are separated
    progressively. The top level has no shared gate and returns one
    representation per task. `num_levels=1` is the single-level CGC model.

    Each level's experts are computed as one batched contraction (see
    `CGC`). The variables of level `l` live under `level_{l}/`, e.g.
    `level_0/experts/kernel_0`.

    Args:
        num_tasks: int >= 1. Number of tasks.
        num_levels: int >= 1. Number of stacked CGC levels.
        num_task_experts: int >= 0. Experts owned by each task, per level.
        num_shared_experts: int >= 0. Shared experts per level. At least one
            of `num_task_experts` and `num_shared_experts` must be >= 1.
        expert_units: int or list of ints, each >= 1. Widths of the layers
            of every expert MLP, at every level; the outputs have width
            `expert_units[-1]`.
        gate_units: list of ints, each >= 1. Hidden widths of every gate MLP
            before its final projection. Defaults to `()`, linear gates.
        expert_activation: activation after each expert layer. Defaults to
            `"relu"`.
        gate_activation: activation after each hidden gate layer. Defaults
            to `"relu"`.
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
        **kwargs: other keyword arguments of `keras.layers.Layer`.

    Call arguments:
        - `inputs`: tensor of shape `(batch, ..., features)`.
        - `training`: bool. Whether dropout is active.
        - `return_gates`: bool. If `True`, also return the gate weights.

    Returns:
        A list of `num_tasks` tensors `(batch, ..., expert_units[-1])`. With
        `return_gates=True`, a tuple `(outputs, gates)` where `gates[l]` is
        the list of level `l`'s gate weights as returned by `CGC`: one per
        task `(batch, ..., num_task_experts + num_shared_experts)`, plus the
        shared gate's below the top level.

    Example:

    ```python
    import numpy as np
    import keras
    import keras_moe

    x = np.random.normal(size=(32, 100)).astype("float32")
    ple = keras_moe.layers.PLE(
        num_tasks=2, num_levels=2, num_task_experts=2,
        num_shared_experts=2, expert_units=[32, 16],
    )
    ctr, cvr = ple(x)  # two (32, 16) tensors
    outputs, gates = ple(x, return_gates=True)
    # gates[0]: level 0, [(32, 4), (32, 4), (32, 6)]; gates[1]: [(32, 4), (32, 4)]
    ```

    References:
        - [Tang et al., 2020. Progressive Layered Extraction (PLE): A Novel
          Multi-Task Learning (MTL) Model for Personalized
          Recommendations](https://dl.acm.org/doi/10.1145/3383313.3412236)
    """

    def __init__(
        self,
        num_tasks,
        num_levels,
        num_task_experts,
        num_shared_experts,
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
        self.num_levels = check_int("num_levels", num_levels, 1)
        self.num_task_experts, self.num_shared_experts = (
            _validate_expert_counts(num_task_experts, num_shared_experts)
        )
        self.expert_units = check_units("expert_units", expert_units)
        self.gate_units = check_units(
            "gate_units", gate_units, allow_empty=True
        )
        self.expert_activation = keras.activations.get(expert_activation)
        self.gate_activation = keras.activations.get(gate_activation)
        self.use_bias = bool(use_bias)
        self.dropout = check_rate("dropout", dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.gate_initializer = keras.initializers.get(gate_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)

        self.levels = [
            CGC(
                self.num_tasks,
                self.num_task_experts,
                self.num_shared_experts,
                self.expert_units,
                gate_units=self.gate_units,
                expert_activation=self.expert_activation,
                gate_activation=self.gate_activation,
                shared_output=level < self.num_levels - 1,
                use_bias=self.use_bias,
                dropout=self.dropout,
                # Levels share the initializers: reseed them per level so
                # equally shaped experts of two levels start different.
                kernel_initializer=reseeded(self.kernel_initializer, level),
                gate_initializer=reseeded(self.gate_initializer, level),
                bias_initializer=reseeded(self.bias_initializer, level),
                kernel_regularizer=self.kernel_regularizer,
                bias_regularizer=self.bias_regularizer,
                dtype=self.dtype_policy,
                name=f"level_{level}",
            )
            for level in range(self.num_levels)
        ]

    def build(self, input_shape):
        for level in self.levels:
            level.build(input_shape)
            input_shape = level.compute_output_shape(input_shape)

    def call(self, inputs, training=None, return_gates=False):
        hidden = inputs
        all_gates = []
        for level in self.levels:
            hidden, gates = level(hidden, training=training, return_gates=True)
            all_gates.append(gates)
        if return_gates:
            return hidden, all_gates
        return hidden

    def compute_output_shape(self, input_shape):
        for level in self.levels:
            input_shape = level.compute_output_shape(input_shape)
        return input_shape

    def compute_output_spec(self, inputs, training=None, return_gates=False):
        hidden = inputs
        all_gates = []
        for level in self.levels:
            hidden, gates = level.compute_output_spec(hidden, return_gates=True)
            all_gates.append(gates)
        if return_gates:
            return hidden, all_gates
        return hidden

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_tasks": self.num_tasks,
                "num_levels": self.num_levels,
                "num_task_experts": self.num_task_experts,
                "num_shared_experts": self.num_shared_experts,
                "expert_units": list(self.expert_units),
                "gate_units": list(self.gate_units),
                "expert_activation": keras.activations.serialize(
                    self.expert_activation
                ),
                "gate_activation": keras.activations.serialize(
                    self.gate_activation
                ),
                **weights_config(self),
                "gate_initializer": keras.initializers.serialize(
                    self.gate_initializer
                ),
            }
        )
        return config
