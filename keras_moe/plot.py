"""Pictures of routing: expert load over epochs, token assignments, drops.

Needs matplotlib, an optional dependency: `pip install "keras-moe[plot]"`.
It is imported when a function here is called, not when `keras_moe` is.
Every function returns a `matplotlib.figure.Figure` (made without `pyplot`,
so no window opens and no global state changes) and, given `path`, writes it
there (PNG for a `.png` path).

The epoch figures come from `keras_moe.callbacks.RouterMonitor`: pass the
monitor itself, or a dict shaped like its `history`
(`{panel title: {"expert_load": [(E,) per epoch], "dropped_fraction":
[...]}}`) to put, say, runs with and without balancing side by side.
"""

import numpy as np


def plot_expert_load(source, layers=None, path=None, title=None):
    """Heatmaps of each expert's load over epochs, one panel per layer.

    The colour is an expert's share of the assignments times `E`: white at
    1.0 (a balanced load), blue toward 0 (a starved expert), red above 1 (an
    overloaded one, up to `E` for an expert taking every token). All panels
    share one colour scale, so runs can be compared.

    Args:
        source: a `RouterMonitor` after `fit`, or a dict of panel title to a
            dict with an `"expert_load"` list of `(E,)` arrays (one per
            epoch).
        layers: optional list of the keys of `source` to draw (default all).
        path: optional file to write (e.g. `"load.png"`).
        title: optional figure title.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    records = _records(source, layers, "expert_load")
    loads = {key: np.asarray(value["expert_load"], "float64") for key, value in records.items()}
    loads = {key: load * load.shape[1] for key, load in loads.items()}  # (epochs, E), 1 = balanced
    vmax = max(2.0, max(float(load.max()) for load in loads.values()))
    figure = _figure(figsize=(4.2 * len(loads) + 0.8, 3.6))
    from matplotlib.colors import TwoSlopeNorm

    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    axes = figure.subplots(1, len(loads), squeeze=False)[0]
    for ax, (key, load) in zip(axes, loads.items()):
        epochs, num_experts = load.shape
        image = ax.imshow(
            load.T, aspect="auto", origin="lower", cmap="RdBu_r", norm=norm,
            extent=(0.5, epochs + 0.5, -0.5, num_experts - 0.5), interpolation="nearest",
        )
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("expert")
    figure.colorbar(image, ax=list(axes), label="load / balanced load")
    return _finish(figure, path, title)


def plot_token_assignment(routing, mask=None, max_tokens=64, path=None, title=None):
    """Which expert each token of a batch went to, and with which weight.

    A tokens-by-experts chart of the combine weights of the dispatched
    assignments; assignments that capacity dropped are marked with a red
    cross.

    Args:
        routing: the dict a routed layer returns with `return_routing=True`
            (`router_logits`, `expert_indices`, `expert_weights`,
            `dispatched`), any leading shape.
        mask: optional bool array of the leading shape, `False` for padding
            (those tokens are left blank, not marked dropped).
        max_tokens: int, the first tokens (in flattened order) to draw.
            Defaults to 64.
        path: optional file to write.
        title: optional figure title.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    num_experts = int(_numpy(routing["router_logits"]).shape[-1])
    indices = _numpy(routing["expert_indices"])
    k = indices.shape[-1]
    indices = indices.reshape(-1, k)[:max_tokens]  # (N, k)
    weights = _numpy(routing["expert_weights"]).reshape(-1, k)[:max_tokens].astype("float64")
    dispatched = _numpy(routing["dispatched"]).reshape(-1, k)[:max_tokens].astype(bool)
    real = np.ones(len(indices), bool) if mask is None else _numpy(mask).reshape(-1)[:max_tokens]
    real = real.astype(bool)
    tokens = np.arange(len(indices))
    chart = np.full((num_experts, len(indices)), np.nan)  # (E, N)
    served = dispatched & real[:, None]
    rows, slots = np.nonzero(served)
    chart[indices[rows, slots], rows] = weights[rows, slots]
    figure = _figure(figsize=(max(4.0, 0.12 * len(indices) + 2.0), 0.3 * num_experts + 1.6))
    ax = figure.subplots()
    image = ax.imshow(chart, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                      vmin=0.0, vmax=max(1.0, float(np.nanmax(chart)) if served.any() else 1.0))
    dropped = ~dispatched & real[:, None]
    rows, slots = np.nonzero(dropped)
    if len(rows):
        ax.scatter(tokens[rows], indices[rows, slots], marker="x", color="red", label="dropped")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel("token")
    ax.set_ylabel("expert")
    figure.colorbar(image, ax=ax, label="combine weight")
    return _finish(figure, path, title)


def plot_dropped_fraction(source, layers=None, path=None, title=None):
    """The share of assignments dropped by capacity, per epoch and layer.

    Args:
        source: a `RouterMonitor` after `fit`, or a dict of curve label to a
            dict with a `"dropped_fraction"` list (one float per epoch).
        layers: optional list of the keys of `source` to draw (default all).
        path: optional file to write.
        title: optional figure title.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    records = _records(source, layers, "dropped_fraction")
    figure = _figure(figsize=(5.5, 3.4))
    ax = figure.subplots()
    for key, value in records.items():
        fractions = np.asarray(value["dropped_fraction"], "float64")
        ax.plot(np.arange(1, len(fractions) + 1), 100 * fractions, marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("assignments dropped (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _finish(figure, path, title)


def _records(source, layers, figure_name):
    records = getattr(source, "history", source)
    if not isinstance(records, dict) or not records:
        raise ValueError(
            "`source` must be a RouterMonitor that has seen training, or a non-empty dict of "
            f"title to figures. Received: {source!r}"
        )
    keys = list(records) if layers is None else list(layers)
    missing = [key for key in keys if key not in records]
    if missing:
        raise ValueError(f"`layers` {missing} are not in the records: {sorted(records)}")
    empty = [key for key in keys if not len(records[key].get(figure_name, ()))]
    if empty:
        raise ValueError(f"No {figure_name!r} recorded for {empty}: train for an epoch first.")
    return {key: records[key] for key in keys}


def _numpy(x):
    if isinstance(x, np.ndarray):
        return x
    import keras

    return keras.ops.convert_to_numpy(x)


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "keras_moe.plot needs matplotlib, an optional dependency. Install it with "
            '`pip install "keras-moe[plot]"` (or `pip install "matplotlib>=3.7"`).'
        ) from error
    return Figure(layout="constrained", **kwargs)


def _finish(figure, path, title):
    if title:
        figure.suptitle(title)
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
