"""A multi-task model: shared mixture, one tower and one head per task."""

import keras

from keras_moe.validation import check_int
from keras_moe.validation import check_units


_HEAD_TYPES = ("binary", "regression")


def _validate_tasks(tasks):
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(
            "`tasks` must be a non-empty dict mapping task names to "
            '"binary", "regression" or a number of classes >= 2. '
            f"Received: tasks={tasks!r}"
        )
    for name, head in tasks.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(
                "Every key of `tasks` must be a non-empty string without "
                f"'/'. Received: tasks={tasks!r}"
            )
        if isinstance(head, str) and head in _HEAD_TYPES:
            continue
        if isinstance(head, bool) or not isinstance(head, int) or head < 2:
            raise ValueError(
                'Every value of `tasks` must be "binary", "regression" or '
                "a number of classes >= 2. Received: "
                f"tasks[{name!r}]={head!r}"
            )
    return dict(tasks)


def _validate_tower_units(tower_units, task_names):
    if isinstance(tower_units, dict):
        if set(tower_units) != set(task_names):
            raise ValueError(
                "When `tower_units` is a dict, its keys must be the task "
                f"names {list(task_names)}. Received keys: "
                f"{list(tower_units)}"
            )
        return {
            name: check_units(
                f"tower_units[{name!r}]", tower_units[name], allow_empty=True
            )
            for name in task_names
        }
    units = check_units("tower_units", tower_units, allow_empty=True)
    return {name: units for name in task_names}


def _head(name, head, dtype):
    policy = keras.dtype_policies.get(dtype or keras.config.dtype_policy())
    if policy.compute_dtype in ("float16", "bfloat16"):
        # Mixed precision: outputs and their activations in float32, as Keras
        # recommends, so that the losses see full-precision probabilities.
        dtype = "float32"
    if head == "binary":
        return keras.layers.Dense(
            1, activation="sigmoid", name=f"{name}_head", dtype=dtype
        )
    if head == "regression":
        return keras.layers.Dense(1, name=f"{name}_head", dtype=dtype)
    return keras.layers.Dense(
        head, activation="softmax", name=f"{name}_head", dtype=dtype
    )


@keras.saving.register_keras_serializable(package="keras_moe")
class MultiTaskModel(keras.Model):
    """Multi-task model: a shared mixture, then one tower and head per task.

    The model is `input -> mixture -> tower_t -> head_t` for every task `t`.
    The `mixture` is any Keras layer that maps the input
    `(batch, input_dim)` either to a list of one tensor per task
    (`keras_moe.layers.MMoE`, `CGC`, `PLE`) or to one tensor shared by all
    towers: a shared-bottom MLP (e.g. a `keras.layers.Dense`) or the
    one-gate mixture OMoE, `MMoE(num_tasks=1, ...)`. Each task then has its
    own tower MLP (`tower_units`, may be empty) and a head chosen by its
    type: `"binary"` gives a sigmoid probability `(batch, 1)`,
    `"regression"` a linear `(batch, 1)`, and an integer `n` a softmax over
    `n` classes `(batch, n)`.

    The model's outputs are a dict keyed by task name, in `tasks` order, so
    it trains the usual Keras way with per-task losses, loss weights and
    metrics given as dicts to `compile()` and labels given as a dict to
    `fit()`. They may also be lists (or tuples) with one entry per task:
    these follow the order of `tasks` on every backend. (A plain functional
    Keras model with dict outputs pairs lists with its outputs in
    alphabetical order of their names.) `keras_moe.models.SharedBottomModel`
    is this model with a shared MLP as the mixture.

    Args:
        input_dim: int >= 1. Number of input features.
        tasks: dict. Maps each task name (a string without `/`) to its head:
            `"binary"`, `"regression"` or a number of classes >= 2. Its order
            is the order of the mixture's per-task outputs.
        mixture: `keras.layers.Layer`. The shared part. It must return one
            tensor, a list of one tensor (both shared by all towers), or a
            list of `len(tasks)` tensors, one per task.
        tower_units: int, list of ints, or dict. Widths of every task's tower
            MLP (each >= 1), or a dict from every task name to its own
            widths. Defaults to `()`: heads sit directly on the mixture.
        tower_activation: activation of the tower layers. Defaults to
            `"relu"`.
        **kwargs: other keyword arguments of `keras.Model`, e.g. `name` and
            `dtype`. Under a mixed-precision policy the heads compute in
            float32.

    Examples:
        >>> import numpy as np
        >>> import keras_moe
        >>> x = np.random.normal(size=(256, 20)).astype("float32")
        >>> labels = {
        ...     "click": np.random.randint(0, 2, size=(256, 1)),
        ...     "watch_time": np.random.normal(size=(256, 1)),
        ... }
        >>> model = MultiTaskModel(
        ...     input_dim=20,
        ...     tasks={"click": "binary", "watch_time": "regression"},
        ...     mixture=keras_moe.layers.MMoE(
        ...         num_tasks=2, num_experts=4, expert_units=16
        ...     ),
        ...     tower_units=[8],
        ... )
        >>> model.compile(
        ...     optimizer="adam",
        ...     loss={"click": "binary_crossentropy", "watch_time": "mse"},
        ...     loss_weights={"click": 1.0, "watch_time": 0.5},
        ... )
        >>> history = model.fit(x, labels, epochs=2, batch_size=32, verbose=0)
        >>> predictions = model.predict(x, verbose=0)
        >>> {name: p.shape for name, p in predictions.items()}
        {'click': (256, 1), 'watch_time': (256, 1)}

        Lists follow the order of `tasks`:

        >>> model.compile(optimizer="adam", loss=["binary_crossentropy", "mse"])
        >>> history = model.fit(
        ...     x, [labels["click"], labels["watch_time"]], epochs=1, verbose=0
        ... )

    References:
        - [Ma et al., 2018. Modeling Task Relationships in Multi-task
          Learning with Multi-gate Mixture-of-Experts](https://dl.acm.org/doi/10.1145/3219819.3220007)
        - [Tang et al., 2020. Progressive Layered Extraction (PLE): A Novel
          Multi-Task Learning (MTL) Model for Personalized
          Recommendations](https://dl.acm.org/doi/10.1145/3383313.3412236)
    """

    def __init__(
        self,
        input_dim,
        tasks,
        mixture,
        tower_units=(),
        tower_activation="relu",
        **kwargs,
    ):
        input_dim = check_int("input_dim", input_dim, 1)
        tasks = _validate_tasks(tasks)
        if not isinstance(mixture, keras.layers.Layer):
            raise ValueError(
                "`mixture` must be a `keras.layers.Layer`. "
                f"Received: mixture={mixture!r}"
            )
        towers = _validate_tower_units(tower_units, list(tasks))
        dtype = kwargs.get("dtype")

        # === Functional model ===
        inputs = keras.Input(shape=(input_dim,), name="features")
        mixed = mixture(inputs)
        if not isinstance(mixed, (list, tuple)):
            mixed = [mixed]
        if len(mixed) == 1:
            mixed = list(mixed) * len(tasks)
        if len(mixed) != len(tasks):
            raise ValueError(
                "`mixture` must return one tensor (shared by all towers) or "
                f"a list of len(tasks) = {len(tasks)} tensors, one per task. "
                f"It returned {len(mixed)} tensors for tasks {list(tasks)}."
            )
        outputs = {}
        for (name, head), hidden in zip(tasks.items(), mixed):
            for i, units in enumerate(towers[name]):
                hidden = keras.layers.Dense(
                    units,
                    activation=tower_activation,
                    name=f"{name}_tower_{i}",
                    dtype=dtype,
                )(hidden)
            outputs[name] = _head(name, head, dtype)(hidden)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.input_dim = input_dim
        self.tasks = tasks
        self.mixture = mixture
        self.tower_units = (
            {name: list(units) for name, units in towers.items()}
            if isinstance(tower_units, dict)
            else list(towers[next(iter(tasks))])
        )
        self.tower_activation = tower_activation

    @property
    def task_names(self):
        """The task names, in the order of the mixture's outputs."""
        return list(self.tasks)

    # === Outputs, labels and per-task settings in `tasks` order ===
    # Keras flattens dict outputs in sorted key order: lists given to
    # `compile()` or `fit()` would pair with the outputs alphabetically (on
    # JAX silently, wrong heads trained), and `predict()` returns its dict
    # sorted on JAX and torch. The model maps every list to task names and
    # returns its dicts in `tasks` order instead.

    def _by_task(self, value, argument):
        """`value` as a dict keyed by task name if it is a list or tuple."""
        if not isinstance(value, (list, tuple)):
            return value
        if len(value) != len(self.tasks):
            raise ValueError(
                f"`{argument}` given as a list must have one entry per task, "
                f"in the order of `tasks`: {self.task_names}. Received "
                f"{len(value)} entries. Pass a dict keyed by task name to "
                "give some tasks none."
            )
        return dict(zip(self.tasks, value))

    def _in_task_order(self, outputs):
        if isinstance(outputs, dict) and set(outputs) == set(self.tasks):
            return {name: outputs[name] for name in self.tasks}
        return outputs

    def _labels_by_task(self, y, argument):
        if y is None:
            return None
        if isinstance(y, dict):
            unknown = sorted(set(y) - set(self.tasks))
            if unknown:
                raise ValueError(
                    f"The keys of `{argument}` must be task names "
                    f"{self.task_names}. Unknown keys: {unknown}"
                )
            return y
        if isinstance(y, (list, tuple)):
            return self._by_task(y, argument)
        if len(self.tasks) == 1:
            return {self.task_names[0]: y}
        if argument == "sample_weight":  # one weight per sample, every task
            return y
        raise ValueError(
            f"The labels of a model with {len(self.tasks)} tasks must be a "
            "dict keyed by task name or a list with one entry per task, in "
            f"the order of `tasks`: {self.task_names}. Received a single "
            f"{type(y).__name__}."
        )

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        loss_weights=None,
        metrics=None,
        weighted_metrics=None,
        **kwargs,
    ):
        """Configures the model for training, like `keras.Model.compile`.

        `loss`, `loss_weights`, `metrics` and `weighted_metrics` may be
        dicts keyed by task name or lists with one entry per task in the
        order of `tasks` (a list of metrics of a single-task model applies
        all of them to its one output, as Keras does).
        """
        loss = self._by_task(loss, "loss")
        loss_weights = self._by_task(loss_weights, "loss_weights")
        if len(self.tasks) > 1:
            metrics = self._by_task(metrics, "metrics")
            weighted_metrics = self._by_task(weighted_metrics, "weighted_metrics")
        super().compile(
            optimizer=optimizer,
            loss=loss,
            loss_weights=loss_weights,
            metrics=metrics,
            weighted_metrics=weighted_metrics,
            **kwargs,
        )

    def compile_from_config(self, config):
        # Keras skips compiling a loaded model whose class overrides
        # `compile()`; this override only maps lists to dicts, so compile as
        # `keras.Model.compile_from_config` would.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def call(self, inputs, training=None, mask=None, **kwargs):
        outputs = super().call(inputs, training=training, mask=mask, **kwargs)
        return self._in_task_order(outputs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return super().compute_loss(
            x,
            self._labels_by_task(y, "y"),
            y_pred,
            self._labels_by_task(sample_weight, "sample_weight"),
            training=training,
        )

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(
            x,
            self._labels_by_task(y, "y"),
            y_pred,
            self._labels_by_task(sample_weight, "sample_weight"),
        )

    def predict(self, x, *args, **kwargs):
        return self._in_task_order(super().predict(x, *args, **kwargs))

    def predict_on_batch(self, x):
        return self._in_task_order(super().predict_on_batch(x))

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "input_dim": self.input_dim,
            "tasks": dict(self.tasks),
            "mixture": keras.saving.serialize_keras_object(self.mixture),
            "tower_units": self.tower_units,
            "tower_activation": keras.activations.serialize(
                keras.activations.get(self.tower_activation)
            ),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["mixture"] = keras.saving.deserialize_keras_object(config["mixture"])
        return cls(**config)
