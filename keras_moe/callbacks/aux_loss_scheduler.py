"""AuxLossScheduler: auxiliary-loss weights and capacity factors on a schedule."""

import math
import numbers
import warnings

import keras

from keras_moe.statistics import select_routed_layers
from keras_moe.validation import check_choice
from keras_moe.validation import check_float
from keras_moe.validation import check_int


def linear_schedule(start, end, duration, delay=0):
    """A linear ramp: `start` until `delay`, then `end` after `duration` more.

    For warm-up (`start=0`) or decay (`end=0`) of a weight with
    `AuxLossScheduler`; `t` counts epochs or steps as the scheduler's `unit`
    says.

    Args:
        start: float, the value up to `t = delay`.
        end: float, the value from `t = delay + duration` on.
        duration: int >= 1, the length of the ramp.
        delay: int >= 0, when the ramp begins. Defaults to 0.

    Returns:
        A function of `t` (an int) returning a float.

    Examples:
        >>> warm_up = linear_schedule(0.0, 1e-2, duration=4)
        >>> [round(warm_up(t), 4) for t in range(6)]
        [0.0, 0.0025, 0.005, 0.0075, 0.01, 0.01]
    """
    start = check_float("start", start)
    end = check_float("end", end)
    duration = check_int("duration", duration, 1)
    delay = check_int("delay", delay, 0)

    def schedule(t):
        progress = min(max((t - delay) / duration, 0.0), 1.0)
        return start + (end - start) * progress

    return schedule


class AuxLossScheduler(keras.callbacks.Callback):
    """Sets auxiliary-loss weights (and capacity factors) on a schedule.

    Each weight is a non-trainable variable of the router
    (`router.loss_weights[name]`, e.g. `"load_balance"` and `"z"` for a
    `TopKRouter`) that the compiled training step reads, so a new value takes
    effect in the next step without recompiling, on every backend. A loss
    whose weight was 0 when its layer was built is not part of the step at
    all: the scheduler refuses to schedule it (give the layer a non-zero
    weight; the schedule sets the value from the first step on, 0 included).

    A capacity-factor schedule is different: capacity is a static shape
    (`ceil(cf * tokens * k / E)` slots), so a new value rebuilds and
    recompiles the training step (and the evaluation and prediction steps,
    which use it when `eval_capacity_factor` is `None`). The scheduler says
    so with a `RuntimeWarning` at each change; schedule it by epoch, not by
    step, unless recompiling every step is acceptable. The new value is
    saved with the model (`get_config`).

    A schedule is a number (constant), a function of `t` returning a float
    (e.g. `linear_schedule(...)`), or a
    `keras.optimizers.schedules.LearningRateSchedule`; `t` is the epoch
    (`unit="epoch"`, set at each epoch's start) or the number of training
    steps taken (`unit="step"`, from `optimizer.iterations`, set before each
    batch). The current values are added to the epoch logs as
    `<name>_loss_weight` and `capacity_factor`.

    Args:
        weights: dict of auxiliary-loss name to schedule. Defaults to `None`.
        capacity_factor: a schedule of the training capacity factor (values
            > 0), or `None`. Only layers with a capacity factor take it.
        layers: `None` (every routed layer whose router has the loss, or
            that has a capacity factor), or a name or list of names.
        unit: `"epoch"` or `"step"`. Defaults to `"epoch"`.

    Examples:
        >>> import keras, numpy as np
        >>> import keras_moe
        >>> model = keras.Sequential([
        ...     keras.Input((6, 8)),
        ...     keras_moe.layers.SparseMoE(4, 16, name="moe"),
        ... ])
        >>> model.compile("adam", "mse")
        >>> scheduler = keras_moe.callbacks.AuxLossScheduler(
        ...     {"load_balance": keras_moe.callbacks.linear_schedule(0.0, 0.02, duration=2)}
        ... )
        >>> x = np.random.rand(8, 6, 8).astype("float32")
        >>> history = model.fit(x, x, epochs=3, verbose=0, callbacks=[scheduler])
        >>> history.history["load_balance_loss_weight"]
        [0.0, 0.01, 0.02]
    """

    def __init__(self, weights=None, capacity_factor=None, layers=None, unit="epoch"):
        super().__init__()
        if weights is not None and not isinstance(weights, dict):
            raise ValueError(
                "`weights` must be a dict of auxiliary-loss name to schedule. "
                f"Received: weights={weights!r}"
            )
        self.weights = dict(weights or {})
        if not self.weights and capacity_factor is None:
            raise ValueError(
                "AuxLossScheduler needs `weights` or `capacity_factor` to schedule. "
                "Received neither."
            )
        for name, schedule in self.weights.items():
            _check_schedule(f"weights[{name!r}]", schedule, positive=False)
        if capacity_factor is not None:
            _check_schedule("capacity_factor", capacity_factor, positive=True)
        self.capacity_factor = capacity_factor
        self.layers = layers
        self.unit = check_choice("unit", unit, ("epoch", "step"))
        self._current = {}

    def on_train_begin(self, logs=None):
        model = self.model
        routed = select_routed_layers(model, self.layers, "AuxLossScheduler")
        self._weight_targets = {name: self._loss_targets(routed, name) for name in self.weights}
        self._capacity_targets = []
        if self.capacity_factor is not None:
            self._capacity_targets = self._capacity_layers(routed)
        self._epoch_base = 0
        if self.unit == "step" and getattr(model, "optimizer", None) is not None:
            self._epoch_base = int(keras.ops.convert_to_numpy(model.optimizer.iterations.value))
        self._current = {}

    def on_epoch_begin(self, epoch, logs=None):
        if self.unit == "epoch":
            self._apply(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if self.unit == "step":
            self._apply(self._epoch_base + batch)

    def on_train_batch_end(self, batch, logs=None):
        self._steps_done = self._epoch_base + batch + 1

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_base = getattr(self, "_steps_done", self._epoch_base)
        if logs is not None:
            for name in self.weights:
                logs[f"{name}_loss_weight"] = self._current[name]
            if self.capacity_factor is not None:
                logs["capacity_factor"] = self._current["capacity_factor"]

    def _apply(self, t):
        model = self.model  # on JAX, state first comes back into the variables
        for name, schedule in self.weights.items():
            value = _evaluate(f"weights[{name!r}]", schedule, t, low=0.0)
            if self._current.get(name) != value:
                for layer in self._weight_targets[name]:
                    layer.router.loss_weights[name].assign(value)
                self._current[name] = value
        if self.capacity_factor is not None:
            value = _evaluate("capacity_factor", self.capacity_factor, t, low=None)
            self._current["capacity_factor"] = value
            changed = [layer for layer in self._capacity_targets if layer.capacity_factor != value]
            if changed:
                self._set_capacity(model, changed, value)

    def _set_capacity(self, model, layers, value):
        described = ", ".join(f"'{layer.name}' {layer.capacity_factor} -> {value}" for layer in layers)
        for layer in layers:
            layer.capacity_factor = value
        if model.train_function is not None:
            warnings.warn(
                f"AuxLossScheduler: capacity_factor of {described}. Capacity is a static shape, "
                "so the training step is rebuilt and recompiles at its next call (as do the "
                "evaluation and prediction steps).",
                RuntimeWarning,
                stacklevel=2,
            )
            model.make_train_function(force=True)
        model.test_function = None
        model.predict_function = None

    @staticmethod
    def _loss_targets(routed, name):
        layers = [layer for layer in routed.values() if name in _loss_names(layer)]
        if not layers:
            raise ValueError(
                f"AuxLossScheduler: no routed layer computes a loss named {name!r}. The routers "
                f"define: { {key: _loss_names(layer) for key, layer in routed.items()} }"
            )
        off = [layer.name for layer in layers if layer.router.initial_loss_weights[name] <= 0]
        if off:
            raise ValueError(
                f"AuxLossScheduler cannot schedule the {name!r} loss of layers {off}: its weight "
                "was 0 when they were built, so the loss is not part of the compiled training "
                "step and no weight can bring it back. Build those layers with a non-zero "
                f"weight for {name!r} (any value > 0; the schedule sets it from the first step "
                "on), or leave them out with `layers`."
            )
        return layers

    @staticmethod
    def _capacity_layers(routed):
        layers = [layer for layer in routed.values() if hasattr(layer, "capacity_factor")]
        dropless = [layer.name for layer in layers if layer.capacity_factor is None]
        if dropless or not layers:
            raise ValueError(
                "AuxLossScheduler: `capacity_factor` is scheduled, but layers "
                f"{dropless or list(routed)} have no capacity factor (they are dropless or have "
                "no capacity). A schedule only changes the factor of layers built with one; "
                "choose those with `layers`."
            )
        return layers


def _loss_names(layer):
    router = getattr(layer, "router", None)
    return tuple(getattr(router, "loss_names", ()))


def _check_schedule(name, schedule, positive):
    if isinstance(schedule, bool) or not (
        isinstance(schedule, numbers.Real) or callable(schedule)
    ):
        raise ValueError(
            f"`{name}` must be a number, a function of the epoch or step, or a "
            f"keras.optimizers.schedules.LearningRateSchedule. Received: {name}={schedule!r}"
        )
    if isinstance(schedule, numbers.Real):
        check_float(name, schedule, low=0, low_inclusive=not positive)


def _evaluate(name, schedule, t, low):
    value = schedule(t) if callable(schedule) else schedule
    value = float(keras.ops.convert_to_numpy(value))
    if not math.isfinite(value) or value < 0 or (low is None and value <= 0):
        bound = ">= 0" if low is not None else "> 0"
        raise ValueError(
            f"The schedule `{name}` must give a finite value {bound}. Received: {value} at t={t}"
        )
    return value
