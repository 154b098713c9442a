"""Initialization of stacked `(E, fan_in, fan_out)` kernels."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_moe")
class StackedInitializer(keras.initializers.Initializer):
    """Initializes each slice `[e]` of a stacked kernel on its own.

    Keras' fan-based initializers treat the leading dimension of a 3-D shape
    as a receptive field (`fan_in = E * d`), which would shrink every expert's
    scale by `sqrt(E)`; and a seeded initializer returns the same values on
    every call, which would make all experts identical. This wrapper calls
    `initializer` once per expert on the 2-D slice shape, offsetting the seed
    of a seeded initializer by the expert index.

    Args:
        initializer: the per-expert initializer (name, config or instance).

    Examples:
        >>> init = StackedInitializer("glorot_uniform")
        >>> tuple(init((4, 8, 16)).shape)
        (4, 8, 16)
        """

    def __init__(self, initializer="glorot_uniform"):
        self.initializer = keras.initializers.get(initializer)

    def __call__(self, shape, dtype=None):
        if len(shape) < 3:
            return self.initializer(shape, dtype=dtype)
        config = self.initializer.get_config()
        seed = config.get("seed")
        slices = []
        for e in range(shape[0]):
            if isinstance(seed, int):
                init = self.initializer.__class__.from_config({**config, "seed": seed + e})
            else:
                init = self.initializer
            slices.append(init(tuple(shape[1:]), dtype=dtype))
        return ops.stack(slices, axis=0)

    def get_config(self):
        return {"initializer": keras.initializers.serialize(self.initializer)}
