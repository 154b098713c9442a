"""The Shared-Bottom multi-task baseline: one MLP shared by every task's tower."""

import keras

from keras_moe.models.multi_task import MultiTaskModel
from keras_moe.validation import check_units


@keras.saving.register_keras_serializable(package="keras_moe")
class SharedBottomModel(MultiTaskModel):
    """Shared-Bottom multi-task model: one shared MLP, then a tower and head per task.

    The classic multi-task baseline (Caruana, 1997) that the mixtures of
    `keras_moe.layers` are measured against: `input -> bottom -> tower_t ->
    head_t`, where the bottom is one MLP of widths `bottom_units` whose
    output every task's tower reads. It is a `MultiTaskModel` whose mixture
    is that MLP, so it trains, saves and predicts the same way and takes the
    same `tasks` and towers; a comparison with MMoE changes one line:

    ```python
    baseline = SharedBottomModel(100, tasks, bottom_units=[128], tower_units=[8])
    mmoe = MultiTaskModel(100, tasks, MMoE(2, 8, 16), tower_units=[8])
    ```

    Args:
        input_dim: int >= 1. Number of input features.
        tasks: dict. Maps each task name (a string without `/`) to its head:
            `"binary"`, `"regression"` or a number of classes >= 2.
        bottom_units: int or list of ints, each >= 1. Widths of the layers
            of the shared MLP.
        tower_units: int, list of ints, or dict. Widths of every task's tower
            MLP (each >= 1), or a dict from every task name to its own
            widths. Defaults to `()`: heads sit directly on the bottom.
        bottom_activation: activation after each bottom layer. Defaults to
            `"relu"`.
        tower_activation: activation of the tower layers. Defaults to
            `"relu"`.
        **kwargs: other keyword arguments of `keras.Model`, e.g. `name` and
            `dtype`.

    Examples:
        >>> import numpy as np
        >>> model = SharedBottomModel(
        ...     input_dim=20,
        ...     tasks={"income": "binary", "never_married": "binary"},
        ...     bottom_units=[32],
        ...     tower_units=[8],
        ... )
        >>> model.compile(optimizer="adam", loss="binary_crossentropy")
        >>> x = np.random.normal(size=(64, 20)).astype("float32")
        >>> labels = [np.random.randint(0, 2, size=(64, 1)) for _ in range(2)]
        >>> history = model.fit(x, labels, epochs=1, verbose=0)
        >>> [p.shape for p in model.predict(x, verbose=0).values()]
        [(64, 1), (64, 1)]

    References:
        - [Caruana, 1997. Multitask Learning](https://doi.org/10.1023/A:1007379606734)
        - [Ma et al., 2018. Modeling Task Relationships in Multi-task
          Learning with Multi-gate Mixture-of-Experts](https://dl.acm.org/doi/10.1145/3219819.3220007)
    """

    def __init__(
        self,
        input_dim,
        tasks,
        bottom_units,
        tower_units=(),
        bottom_activation="relu",
        tower_activation="relu",
        **kwargs,
    ):
        bottom_units = check_units("bottom_units", bottom_units)
        bottom = keras.Sequential(
            [
                keras.layers.Dense(
                    units,
                    activation=bottom_activation,
                    name=f"bottom_{i}",
                    dtype=kwargs.get("dtype"),
                )
                for i, units in enumerate(bottom_units)
            ],
            name="shared_bottom",
        )
        super().__init__(
            input_dim,
            tasks,
            bottom,
            tower_units=tower_units,
            tower_activation=tower_activation,
            **kwargs,
        )
        self.bottom_units = list(bottom_units)
        self.bottom_activation = bottom_activation

    def get_config(self):
        config = super().get_config()
        del config["mixture"]
        config["bottom_units"] = self.bottom_units
        config["bottom_activation"] = keras.activations.serialize(
            keras.activations.get(self.bottom_activation)
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
