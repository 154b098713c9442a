"""Progressive Layered Extraction (PLE): stacked CGC levels."""

import keras

from keras_moe.experts.initializers import reseeded
from keras_moe.layers.cgc import CGC
from keras_moe.layers.cgc import check_expert_counts
from keras_moe.layers.multi_task_mixture import MultiTaskMixture
from keras_moe.validation import check_int
from keras_moe.validation import check_units_per_stage
from keras_moe.validation import is_per_stage


@keras.saving.register_keras_serializable(package="keras_moe")
class PLE(MultiTaskMixture):
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

    The experts of every level may have the same widths
    (`expert_units=[64, 32]`) or their own (`expert_units=[[64], [32]]`,
    one entry per level), e.g. to narrow the representations level by
    level. Each level's experts are computed as one batched contraction (see
    `CGC`). The variables of level `l` live under `level_{l}/`, e.g.
    `level_0/experts/kernel_0`.

    Args:
        num_tasks: int >= 1. Number of tasks.
        num_levels: int >= 1. Number of stacked CGC levels.
        num_task_experts: int >= 0. Experts owned by each task, per level.
        num_shared_experts: int >= 0. Shared experts per level. At least one
            of `num_task_experts` and `num_shared_experts` must be >= 1.
        expert_units: widths of the layers of every expert MLP. An int or a
            list of ints (each >= 1) gives the experts of every level these
            widths; a list of `num_levels` such entries, at least one of them
            a list, gives level `l` the widths `expert_units[l]`. The outputs
            have the width of the top level's last layer.
        gate_units: list of ints, each >= 1. Hidden widths of every gate MLP
            before its final projection. Defaults to `()`, linear gates.
        expert_activation: activation after each expert layer. Defaults to
            `"relu"`.
        gate_activation: activation after each hidden gate layer. Defaults
            to `"relu"`.
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
        - `inputs`: tensor of shape `(batch, ..., features)`.
        - `training`: bool. Whether dropout is active.
        - `return_gates`: bool. If `True`, also return the gate weights.

    Returns:
        A list of `num_tasks` tensors `(batch, ..., width)`, `width` the
        top level's expert output width. With `return_gates=True`, a tuple
        `(outputs, gates)` where `gates[l]` is the list of level `l`'s gate
        weights as returned by `CGC`: one per task
        `(batch, ..., num_task_experts + num_shared_experts)`, plus the
        shared gate's below the top level.

    Examples:
        >>> import numpy as np
        >>> x = np.random.normal(size=(32, 100)).astype("float32")
        >>> ple = PLE(
        ...     num_tasks=2, num_levels=2, num_task_experts=2,
        ...     num_shared_experts=2, expert_units=[32, 16],
        ... )
        >>> ctr, cvr = ple(x)
        >>> tuple(ctr.shape)
        (32, 16)
        >>> outputs, gates = ple(x, return_gates=True)
        >>> [[tuple(g.shape) for g in level] for level in gates]
        [[(32, 4), (32, 4), (32, 6)], [(32, 4), (32, 4)]]

        Experts of their own widths per level:

        >>> narrowing = PLE(2, 2, 1, 1, expert_units=[[64], [16]])
        >>> [tuple(o.shape) for o in narrowing(x)]
        [(32, 16), (32, 16)]

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
        # `expert_units` per level can only be checked against `num_levels`.
        self.num_levels = check_int("num_levels", num_levels, 1)
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
        self.levels = [
            CGC(
                self.num_tasks,
                self.num_task_experts,
                self.num_shared_experts,
                self.level_expert_units[level],
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

    def _check_expert_units(self, expert_units):
        self.level_expert_units = check_units_per_stage(
            "expert_units", expert_units, self.num_levels
        )
        # Stored as given, so that the config of a PLE with equal levels
        # keeps the form it had before widths per level existed.
        if is_per_stage(expert_units):
            return self.level_expert_units
        return self.level_expert_units[0]

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
                "num_levels": self.num_levels,
                "num_task_experts": self.num_task_experts,
                "num_shared_experts": self.num_shared_experts,
            }
        )
        return config

