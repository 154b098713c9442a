"""A plain or gated (GLU) feed-forward network, and the dense FFN layer."""

import keras
from keras import ops

from keras_moe.experts import activations
from keras_moe.experts.initializers import reseeded
from keras_moe.validation import check_bool
from keras_moe.validation import check_int


def feed_forward(x, project, activation, gated):
    """`down(act(up(x)))`, or `down(act(gate(x)) * up(x))` when `gated`.

    `project(tensor, name)` applies the projection `name` in
    `{"up", "gate", "down"}` (kernel and bias) in whatever layout the caller
    holds its tokens; this and `activate` are the one place the FFN formula
    is written. A `GatedActivation` combines the two halves itself:
    `down(act(gate, up))`.
    """
    first = [project(x, "up")] + ([project(x, "gate")] if gated else [])
    return project(activate(first, activation), "down")


def activate(first, activation):
    """The FFN's hidden activation from its first projections.

    Args:
        first: `[up]`, or `[up, gate]` for a gated linear unit.
        activation: the activation function, or a `GatedActivation` (which
            takes both halves: `act(gate, up)`).

    Returns:
        `act(up)`, `act(gate) * up`, or `act(gate, up)`.
    """
    if len(first) == 2:
        if activations.is_gated(activation):
            return activation(first[1], first[0])
        return activation(first[1]) * first[0]
    return activation(first[0])


@keras.saving.register_keras_serializable(package="keras_moe")
class FeedForward(keras.layers.Layer):
    """A dense feed-forward network, used as the always-on shared expert.

    `gated=False`: `down(act(x @ up_kernel))`;
    `gated=True`: `down(act(x @ gate_kernel) * (x @ up_kernel))` (SwiGLU with
    `activation="silu"`).

    Args:
        intermediate_dim: int >= 1, the hidden width.
        activation: activation name or callable, or a gated activation
            (`keras_moe.experts.ClampedSwiGLU`, `"clamped_swiglu"`; needs
            `gated=True`). Defaults to `"gelu"`.
        gated: bool, use a gated linear unit. Defaults to `False`.
        kernel_initializer: initializer of the kernels.

    Examples:
        >>> import numpy as np
        >>> ffn = FeedForward(intermediate_dim=32, gated=True, activation="silu")
        >>> tuple(ffn(np.zeros((2, 5, 16), "float32")).shape)
        (2, 5, 16)

    References:
        - [Shazeer, 2020](https://arxiv.org/abs/2002.05202) (GLU variants)
    """

    def __init__(
        self,
        intermediate_dim,
        activation="gelu",
        gated=False,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.intermediate_dim = check_int("intermediate_dim", intermediate_dim, 1)
        self.gated = check_bool("gated", gated)
        self.activation = activations.check_gated_activation(
            activations.get(activation), self.gated
        )
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        hidden = input_shape[-1]
        width = self.intermediate_dim

        def init(name):
            # One initializer instance with an integer seed would give the
            # up and gate kernels equal values.
            return reseeded(self.kernel_initializer, f"{self.name}/{name}")

        self.up_kernel = self.add_weight(
            name="up_kernel", shape=(hidden, width), initializer=init("up_kernel")
        )
        self.gate_kernel = None
        if self.gated:
            self.gate_kernel = self.add_weight(
                name="gate_kernel", shape=(hidden, width), initializer=init("gate_kernel")
            )
        self.down_kernel = self.add_weight(
            name="down_kernel", shape=(width, hidden), initializer=init("down_kernel")
        )

    def call(self, inputs):
        kernels = {"up": self.up_kernel, "gate": self.gate_kernel, "down": self.down_kernel}
        return feed_forward(
            inputs,
            lambda t, name: ops.matmul(t, kernels[name]),
            self.activation,
            self.gated,
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "intermediate_dim": self.intermediate_dim,
                "activation": keras.activations.serialize(self.activation),
                "gated": self.gated,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
