"""Expert activations beyond Keras' own: gated activations and tanh-GELU.

A gated (GLU) expert computes `down(act(x @ gate) * (x @ up))`. Some models
change more than `act`: GPT-OSS clamps both projections and adds one to the
linear half. A `GatedActivation` receives both halves, `(gate, up)`, and
returns the hidden activation, so such experts stay one batched FFN. Experts
and `SparseMoE` accept one wherever they take an activation, by object or by
name (`"clamped_swiglu"`); it needs `gated=True`.
"""

import keras
from keras import ops

from keras_moe.validation import check_positive

_PACKAGE = "keras_moe"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GatedActivation:
    """Base class of activations that combine the gate and up projections.

    Subclasses implement `__call__(gate, up)` returning the hidden
    activation `(..., intermediate_dim)` and `get_config`. The default is the
    plain GLU with identity gate, `gate * up`.
    """

    def __call__(self, gate, up):
        return gate * up

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ClampedSwiGLU(GatedActivation):
    """GPT-OSS's clamped SwiGLU: `(clip(up) + 1) * g * sigmoid(alpha * g)`.

    With `g = min(gate, limit)` and `clip(up) = clip(up, -limit, limit)`.
    The clamps bound the activations of very large pre-activations (the
    gate only from above), and the `+ 1` lets an expert pass its gate
    through when the linear half is zero.

    Args:
        alpha: float > 0, the sigmoid's slope (GPT-OSS: 1.702, the
            sigmoid approximation of GELU). Defaults to 1.702.
        limit: float > 0, the clamp. Defaults to 7.0.

    Examples:
        >>> import keras, numpy as np
        >>> act = ClampedSwiGLU()
        >>> gate = np.array([0.0, 1.0, 100.0], "float32")
        >>> up = np.array([1.0, 0.0, -100.0], "float32")
        >>> [round(float(v), 3) for v in keras.ops.convert_to_numpy(act(gate, up))]
        [0.0, 0.846, -42.0]

    References:
        - [OpenAI, 2025 (gpt-oss model card)](https://arxiv.org/abs/2508.10925)
    """

    def __init__(self, alpha=1.702, limit=7.0):
        self.alpha = check_positive("alpha", alpha)
        self.limit = check_positive("limit", limit)

    def __call__(self, gate, up):
        gate = ops.minimum(gate, self.limit)
        up = ops.clip(up, -self.limit, self.limit)
        return (up + 1.0) * gate * ops.sigmoid(self.alpha * gate)

    def get_config(self):
        return {"alpha": self.alpha, "limit": self.limit}


@keras.saving.register_keras_serializable(package=_PACKAGE)
def gelu_approximate(x):
    """GELU with the tanh approximation (Gemma's feed-forward activation).

    `keras.activations.gelu` defaults to the exact (erf) form; the
    approximate one, as a named function, can be saved in a config.
    """
    return keras.activations.gelu(x, approximate=True)


#: Activations known by name here, in addition to Keras' own.
NAMED = {
    "clamped_swiglu": ClampedSwiGLU,
    "gelu_approximate": lambda: gelu_approximate,
}


def get(identifier):
    """An activation from a name, config or callable.

    Accepts this module's names (`"clamped_swiglu"`, `"gelu_approximate"`),
    then anything `keras.activations.get` accepts (names, serialized
    configs of registered functions and objects, callables).
    """
    if isinstance(identifier, str) and identifier in NAMED:
        return NAMED[identifier]()
    return keras.activations.get(identifier)


def is_gated(activation):
    """Whether `activation` takes `(gate, up)` rather than one tensor."""
    return isinstance(activation, GatedActivation)


def check_gated_activation(activation, gated):
    """Raises `ValueError` if a gated activation is used without `gated=True`."""
    if is_gated(activation) and not gated:
        raise ValueError(
            f"`activation={type(activation).__name__}` combines the gate and up "
            "projections of a gated (GLU) feed-forward network, so it needs "
            "`gated=True`. Received: gated=False"
        )
    return activation
