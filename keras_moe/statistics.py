"""Routing statistics of every routed layer of a model.

The statistics protocol: a layer takes part if it has a method
`routing_statistics()` that returns a dict of figures about its training
calls, as NumPy arrays and Python numbers. `keras_moe.layers.MoE` (and so
`SparseMoE`, `SwitchFFN` and every layer built on it) implements it; a layer
of another kind (e.g. dense-slot Soft MoE) adopts it by defining the method.
The figures with a fixed meaning, all optional except `expert_load`:

- `expert_load` `(E,)`: each expert's share of the assignments of the latest
  training call (sums to 1; all zeros before the first call);
- `average_load` `(E,)`: a running average of `expert_load`;
- `assignment_counts` `(E,)`: the assignments behind `expert_load`;
- `load_max_mean_ratio`, `dropped_fraction`, `router_entropy`,
  `router_confidence` (floats, latest training call);
- `aux_losses`: a dict of auxiliary-loss name to unweighted value;
- `training_steps` (int): the training calls counted.

`keras_moe.callbacks.RouterMonitor` logs every float figure and every
auxiliary loss (as `<name>_loss`), and records `expert_load` per epoch, so a
layer may add figures of its own. `keras_moe.callbacks.ExpertBiasBalancer`
needs more: an `accumulated_counts` `(E,)` variable summed over training calls
and a `router.expert_bias` variable.
"""

import keras


def routed_layers(model):
    """The layers of `model` that expose routing statistics, by name.

    Nested models and layers inside layers are searched. A layer's key is its
    name, or, where two routed layers share a name, the names of the layers
    that lead to it joined by `/` (the model's own name left out).

    Args:
        model: a `keras.Model` or any `keras.layers.Layer`.

    Returns:
        A dict of key to layer, in the order of the model's layers.
    """
    found, seen = [], set()

    def visit(layer, path):
        if id(layer) in seen:  # a layer shared by two parents counts once
            return
        seen.add(id(layer))
        if callable(getattr(layer, "routing_statistics", None)):
            found.append((layer, path))
        for child in getattr(layer, "_layers", ()):
            visit(child, path + (child.name,))

    visit(model, ())
    names = [layer.name for layer, _ in found]
    return {
        (layer.name if names.count(layer.name) == 1 else "/".join(path)): layer
        for layer, path in found
    }


def routing_stats(model):
    """The routing statistics of every routed layer of `model`, by layer name.

    Each value is the layer's `routing_statistics()`: for the layers of this
    library the per-expert assignment counts of the latest training batch
    (before capacity) and their running average, the share of assignments
    dropped by capacity, router entropy and confidence, the auxiliary losses
    before weighting and the max/mean load ratio, counting routed
    (unmasked) tokens only. Only training calls update them.

    On JAX, `fit` keeps the model state outside the variables during an epoch;
    this function brings it back first (`model.jax_state_sync()`), so pass the
    model being trained (in a callback: `self.model`), not a layer of it.

    Args:
        model: a `keras.Model` or any `keras.layers.Layer`.

    Returns:
        A dict of layer key (see `routed_layers`) to that layer's statistics.

    Examples:
        >>> import keras, numpy as np
        >>> import keras_moe
        >>> model = keras.Sequential([
        ...     keras.Input((6, 8)),
        ...     keras_moe.layers.SparseMoE(4, 16, name="moe"),
        ... ])
        >>> _ = model(np.ones((2, 6, 8), "float32"), training=True)
        >>> stats = keras_moe.routing_stats(model)["moe"]
        >>> float(stats["assignment_counts"].sum())  # 12 tokens, top-2
        24.0
        >>> sorted(stats["aux_losses"])
        ['load_balance', 'z']
    """
    sync = getattr(model, "jax_state_sync", None)
    if keras.backend.backend() == "jax" and callable(sync):
        sync()
    return {name: layer.routing_statistics() for name, layer in routed_layers(model).items()}


def select_routed_layers(model, layers, caller):
    """The routed layers of `model` a callback acts on, by key.

    Args:
        model: the model.
        layers: `None` (every routed layer), a layer name or key, or a list
            of them.
        caller: the name used in error messages.

    Returns:
        A dict of key (see `routed_layers`) to layer.

    Raises:
        ValueError: if a name matches no routed layer.
    """
    available = routed_layers(model)
    if layers is None:
        return available
    chosen = {}
    for name in [layers] if isinstance(layers, str) else list(layers):
        matches = {key: layer for key, layer in available.items() if name in (key, layer.name)}
        if not matches:
            raise ValueError(
                f"{caller}: `layers` names {name!r}, which is not a routed layer of the model. "
                f"Routed layers: {sorted(available)}"
            )
        chosen.update(matches)
    return chosen
