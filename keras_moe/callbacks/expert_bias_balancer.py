"""ExpertBiasBalancer: DeepSeek-V3's aux-loss-free balancing, every N steps."""

import keras
import numpy as np

from keras_moe.statistics import select_routed_layers
from keras_moe.validation import check_int
from keras_moe.validation import check_positive


class ExpertBiasBalancer(keras.callbacks.Callback):
    """Moves each router's expert bias toward balance every N training steps.

    DeepSeek-V3's auxiliary-loss-free load balancing: experts are chosen by
    `scores + expert_bias` (the bias never enters the combine weights), and
    after every `every_n_steps` training steps each expert's bias moves by
    `update_rate * sign(mean_load - load_e)`, where `load_e` counts the
    assignments routed to expert `e` (before capacity, routed tokens only)
    over those steps: overloaded experts become less attractive, starved
    ones more. The counts accumulate inside the compiled step (the layer's
    non-trainable `accumulated_counts`); the callback reads them, updates
    `router.expert_bias` and clears them, so the step never recompiles.

    This is an alternative to the router's per-call update
    (`expert_bias_update_rate`), which updates from every batch on its own;
    using both on one layer is refused. Steps left over at the end of
    training (fewer than `every_n_steps`) are not applied.

    Args:
        update_rate: float > 0, the bias step `u` (DeepSeek-V3: 1e-3).
        every_n_steps: int >= 1, training steps per update. Defaults to 1.
        layers: `None` (every routed layer whose router has an
            `expert_bias`), or a name or list of names.

    Examples:
        >>> import keras, numpy as np
        >>> import keras_moe
        >>> model = keras.Sequential([
        ...     keras.Input((6, 8)),
        ...     keras_moe.layers.SparseMoE(4, 16, score_func="sigmoid", name="moe"),
        ... ])
        >>> model.compile("adam", "mse")
        >>> balancer = keras_moe.callbacks.ExpertBiasBalancer(1e-3, every_n_steps=2)
        >>> x = np.random.rand(8, 6, 8).astype("float32")
        >>> _ = model.fit(x, x, batch_size=2, epochs=1, verbose=0, callbacks=[balancer])
        >>> balancer.updates  # 4 steps, one update every 2
        2

    References:
        - [Wang et al., 2024 (Auxiliary-loss-free load balancing)](https://arxiv.org/abs/2408.15664)
        - [DeepSeek-AI, 2024 (DeepSeek-V3)](https://arxiv.org/abs/2412.19437)
    """

    def __init__(self, update_rate, every_n_steps=1, layers=None):
        super().__init__()
        self.update_rate = check_positive("update_rate", update_rate)
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1)
        self.layers = layers
        self.updates = 0

    def on_train_begin(self, logs=None):
        routed = select_routed_layers(self.model, self.layers, "ExpertBiasBalancer")
        self._targets = [layer for layer in routed.values() if _balanceable(layer)]
        refused = [key for key, layer in routed.items() if not _balanceable(layer)]
        if (self.layers is not None and refused) or not self._targets:
            raise ValueError(
                "ExpertBiasBalancer needs routed layers whose router has an `expert_bias` "
                "(e.g. TopKRouter) and that accumulate `accumulated_counts`. "
                f"Layers without: {refused or list(routed)}"
            )
        both = [layer.name for layer in self._targets
                if getattr(layer.router, "expert_bias_update_rate", 0.0) > 0]
        if both:
            raise ValueError(
                f"ExpertBiasBalancer: the routers of layers {both} already update their expert "
                "bias on every call (expert_bias_update_rate > 0). Use one of the two: build "
                "them with expert_bias_update_rate=0, or drop the callback."
            )
        for layer in self._targets:
            _clear(layer.accumulated_counts)
        self._steps = 0
        self._epoch_base = 0
        self.updates = 0

    def on_train_batch_end(self, batch, logs=None):
        steps = self._epoch_base + batch + 1
        if steps // self.every_n_steps > self._steps // self.every_n_steps:
            self._update()
        self._steps = steps

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_base = self._steps

    def _update(self):
        self.model  # noqa: B018 -- on JAX, brings the trained state into the variables
        for layer in self._targets:
            counts = keras.ops.convert_to_numpy(layer.accumulated_counts.value)
            if counts.sum() > 0:
                step = self.update_rate * np.sign(counts.mean() - counts)
                bias = keras.ops.convert_to_numpy(layer.router.expert_bias.value)
                layer.router.expert_bias.assign((bias + step).astype(bias.dtype))
            _clear(layer.accumulated_counts)
        self.updates += 1


def _balanceable(layer):
    router = getattr(layer, "router", None)
    return (
        getattr(router, "expert_bias", None) is not None
        and getattr(layer, "accumulated_counts", None) is not None
    )


def _clear(variable):
    variable.assign(np.zeros(variable.shape, "float32"))
