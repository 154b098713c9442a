"""Initialization of stacked `(E, fan_in, fan_out)` kernels."""

import zlib

import keras
import numpy as np
from keras import ops


def reseeded(initializer, *salt):
    """A copy of `initializer` with a seed derived from its own and `salt`.

    Keras initializers seeded with an integer (or unseeded, which draws an
    integer seed once at construction) return the same values on every
    call. Layers that share one initializer instance use this to draw
    different values, reproducibly. Initializers without an integer seed
    (zeros, constant, or seeded by a `keras.random.SeedGenerator`, which
    advances by itself) are returned unchanged.
    """
    seed = getattr(initializer, "seed", None)
    if (
        not isinstance(initializer, keras.initializers.Initializer)
        or isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
    ):
        return initializer
    config = initializer.get_config()
    if "seed" not in config:
        return initializer
    entropy = [int(seed)] + [zlib.crc32(str(s).encode("utf-8")) for s in salt]
    new_seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
    return initializer.__class__.from_config({**config, "seed": new_seed % (2**31 - 1)})


@keras.saving.register_keras_serializable(package="keras_moe")
class StackedInitializer(keras.initializers.Initializer):
    """Initializes each slice `[e]` of a stacked kernel on its own.

    Keras' fan-based initializers treat the leading dimension of a 3-D shape
    as a receptive field (`fan_in = E * d`), which would shrink every expert's
    scale by `sqrt(E)`; and a Keras initializer with an integer seed (an
    unseeded one draws its integer seed once, at construction) returns the
    same values on every call, which would make all experts identical. This
    wrapper calls `initializer` once per slice, on the 2-D slice shape, with
    a seed derived from the initializer's own seed, `salt` and the slice
    index (`reseeded`).

    Args:
        initializer: the per-expert initializer (name, config or instance).
        salt: a string that tells apart variables sharing one initializer
            (e.g. the variable's name), so they do not start equal.

    Examples:
        >>> init = StackedInitializer("glorot_uniform", salt="up_kernel")
        >>> tuple(init((4, 8, 16)).shape)
        (4, 8, 16)
    """

    def __init__(self, initializer="glorot_uniform", salt=""):
        self.initializer = keras.initializers.get(initializer)
        self.salt = salt

    def __call__(self, shape, dtype=None):
        if len(shape) < 3:
            return reseeded(self.initializer, self.salt)(shape, dtype=dtype)
        return ops.stack(
            [
                reseeded(self.initializer, self.salt, e)(tuple(shape[1:]), dtype=dtype)
                for e in range(shape[0])
            ],
            axis=0,
        )

    def get_config(self):
        return {"initializer": keras.initializers.serialize(self.initializer), "salt": self.salt}
