"""RouterMonitor: routing statistics into the training logs, with alarms."""

import warnings

import keras
import numpy as np

from keras_moe.statistics import select_routed_layers
from keras_moe.validation import check_int
from keras_moe.validation import check_positive
from keras_moe.validation import check_rate


class RouterMonitor(keras.callbacks.Callback):
    """Puts each routed layer's routing statistics into the training logs.

    After every training batch the monitor reads the statistics of the
    model's routed layers (`keras_moe.routing_stats`) and adds them to the
    batch logs; at the end of an epoch it adds their means over the epoch's
    batches to the epoch logs. Keys are `<layer>/<figure>`:
    `dropped_fraction`, `load_max_mean_ratio`, `router_entropy`,
    `router_confidence`, and each auxiliary loss before weighting as
    `<name>_loss` (e.g. `moe/load_balance_loss`); with
    `log_expert_load=True` also each expert's share of the assignments as
    `<layer>/load_<e>`. So they reach `History`, the progress bar,
    `keras.callbacks.CSVLogger` and `keras.callbacks.TensorBoard` scalars;
    list the monitor before those callbacks, which read the logs after it.

    It also keeps a per-epoch record in `history` (for `keras_moe.plot`) and
    warns (`RuntimeWarning`) when an expert's share of the assignments stays
    below `collapse_threshold` of the balanced share `1 / E` for
    `collapse_patience` epochs in a row (router collapse), or when an epoch
    drops more than `max_dropped_fraction` of its assignments to capacity.

    The figures describe training calls only: validation and prediction do
    not change them. Reading them after a batch waits for that batch to
    finish, and on JAX brings the model state back into the variables (the
    way a callback must see state there); `update_freq` reads less often.
    With `steps_per_execution > 1` a read sees the last step of the
    execution. `history` and the alarms start afresh with each `fit`.

    Args:
        layers: `None` (every routed layer), or a name or list of names of
            the routed layers to watch. Defaults to `None`.
        update_freq: int >= 1, read the statistics every `update_freq`
            batches (and at least once per epoch); epoch figures average the
            batches read. Defaults to 1.
        log_expert_load: bool, also log each expert's load. Defaults to
            `False` (`E` figures per layer would crowd the progress bar).
        collapse_threshold: float in `[0, 1)` or `None` (no collapse alarm):
            an expert is starved while its epoch share is below this
            fraction of `1 / E`. Defaults to 0.1.
        collapse_patience: int >= 1, starved epochs in a row before the
            alarm. Defaults to 3.
        max_dropped_fraction: float > 0 or `None` (no alarm): the share of
            assignments an epoch may drop. Defaults to 0.1.

    Attributes:
        history: dict of layer key to a dict of figure name to the list of
            its epoch values; `history[layer]["expert_load"]` holds one
            `(E,)` array of load shares per epoch.

    Examples:
        >>> import keras, numpy as np
        >>> import keras_moe
        >>> model = keras.Sequential([
        ...     keras.Input((6, 8)),
        ...     keras_moe.layers.SparseMoE(4, 16, name="moe"),
        ... ])
        >>> model.compile("adam", "mse")
        >>> monitor = keras_moe.callbacks.RouterMonitor()
        >>> x = np.random.rand(8, 6, 8).astype("float32")
        >>> history = model.fit(x, x, epochs=2, verbose=0, callbacks=[monitor])
        >>> len(history.history["moe/dropped_fraction"])
        2
        >>> monitor.history["moe"]["expert_load"][-1].shape
        (4,)
    """

    def __init__(
        self,
        layers=None,
        update_freq=1,
        log_expert_load=False,
        collapse_threshold=0.1,
        collapse_patience=3,
        max_dropped_fraction=0.1,
    ):
        super().__init__()
        self.layers = layers
        self.update_freq = check_int("update_freq", update_freq, 1)
        self.log_expert_load = bool(log_expert_load)
        self.collapse_threshold = (
            None if collapse_threshold is None else check_rate("collapse_threshold", collapse_threshold)
        )
        self.collapse_patience = check_int("collapse_patience", collapse_patience, 1)
        self.max_dropped_fraction = (
            None if max_dropped_fraction is None
            else check_positive("max_dropped_fraction", max_dropped_fraction)
        )
        self.history = {}
        self._targets = {}

    def on_train_begin(self, logs=None):
        self._targets = select_routed_layers(self.model, self.layers, "RouterMonitor")
        self.history = {key: {} for key in self._targets}
        self._starved = {key: {} for key in self._targets}  # expert -> epochs in a row

    def on_epoch_begin(self, epoch, logs=None):
        self._sums = {}  # layer key -> {figure: running sum}
        self._reads = 0

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.update_freq == 0:
            figures = self._read()
            if logs is not None:
                logs.update(self._flat(figures))

    def on_epoch_end(self, epoch, logs=None):
        if not self._reads:
            self._read()
        epoch_figures = {
            key: {name: total / self._reads for name, total in sums.items()}
            for key, sums in self._sums.items()
        }
        for key, figures in epoch_figures.items():
            for name, value in figures.items():
                self.history[key].setdefault(name, []).append(value)
            self._check_alarms(key, figures, epoch)
        if logs is not None:
            logs.update(self._flat(epoch_figures))

    def _read(self):
        """The figures of every watched layer now, added to the epoch sums."""
        self.model  # noqa: B018 -- on JAX, brings the trained state into the variables
        figures = {}
        for key, layer in self._targets.items():
            stats = layer.routing_statistics()
            layer_figures = {
                name: value for name, value in stats.items()
                if isinstance(value, float)
            }
            for name, value in stats.get("aux_losses", {}).items():
                layer_figures[f"{name}_loss"] = float(value)
            layer_figures["expert_load"] = np.asarray(stats["expert_load"], "float64")
            figures[key] = layer_figures
            sums = self._sums.setdefault(key, {})
            for name, value in layer_figures.items():
                sums[name] = sums.get(name, 0.0) + value
        self._reads += 1
        return figures

    def _flat(self, figures):
        logs = {}
        for key, layer_figures in figures.items():
            for name, value in layer_figures.items():
                if name != "expert_load":
                    logs[f"{key}/{name}"] = float(value)
                elif self.log_expert_load:
                    logs.update({f"{key}/load_{e}": float(v) for e, v in enumerate(value)})
        return logs

    def _check_alarms(self, key, figures, epoch):
        load = figures["expert_load"]
        if self.collapse_threshold is not None and load.sum() > 0:
            floor = self.collapse_threshold / load.size
            starved = self._starved[key]
            for expert, share in enumerate(load):
                starved[expert] = starved.get(expert, 0) + 1 if share < floor else 0
                if starved[expert] == self.collapse_patience:
                    warnings.warn(
                        f"RouterMonitor: expert {expert} of layer '{key}' has received less than "
                        f"{self.collapse_threshold:.0%} of a balanced share of the assignments "
                        f"(share < {floor:.4f}) for {self.collapse_patience} epochs, up to epoch "
                        f"{epoch + 1}: the router may have collapsed onto fewer experts. A "
                        "load-balancing loss or keras_moe.callbacks.ExpertBiasBalancer "
                        "counteracts this.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        dropped = figures.get("dropped_fraction")
        if self.max_dropped_fraction is not None and dropped is not None:
            if dropped > self.max_dropped_fraction:
                warnings.warn(
                    f"RouterMonitor: layer '{key}' dropped {dropped:.1%} of its assignments to "
                    f"capacity in epoch {epoch + 1} (limit {self.max_dropped_fraction:.1%}). "
                    "A larger capacity_factor or better balance keeps more tokens.",
                    RuntimeWarning,
                    stacklevel=2,
                )
