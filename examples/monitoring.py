"""Watching the router: a collapse without balancing, and two ways out of it.

A Switch-style layer (top-1 routing, the chosen expert's probability as its
weight, capacity factor 1.25 in training and 2.0 in evaluation) learns a
mixture of regressions: each token belongs to one of 8 clusters, and each
cluster has its own linear map from input to target, so 8 experts have 8
jobs. All inputs share one large offset vector (as unnormalized embeddings
do), so at initialization every token's router logits look alike: nearly all
tokens pick the same expert, that expert learns, and the router learns to
trust it more. Three runs from the same initialization:

- no balancing: the router collapses onto half of the experts, capacity
  drops 44% of the assignments, and the validation error stays high;
- a load-balancing loss (weight 0.1, decayed to 0.01 over epochs 8-10 by
  `AuxLossScheduler`): the load spreads out over a few epochs, and creeps
  back toward imbalance once the weight is decayed;
- `ExpertBiasBalancer` (DeepSeek-V3's aux-loss-free bias update every step,
  rate 0.01, no auxiliary loss): balanced within an epoch.

`RouterMonitor` puts the routing figures into the logs (printed below per
epoch) and warns about the collapse; `keras_moe.plot` draws the expert-load
heatmaps side by side, the dropped-fraction curves and the token-to-expert
assignment of one validation batch with and without balancing.

    python examples/monitoring.py            # full run, about 1-2 minutes on 2 CPU cores
    KERAS_BACKEND=torch python examples/monitoring.py --smoke   # seconds

The figures go to `--out-dir` (default `docs/assets`, a temporary folder in
smoke mode): `monitoring_expert_load.png`, `monitoring_dropped.png`,
`monitoring_tokens_collapsed.png` and `monitoring_tokens_balanced.png`.
"""

import argparse
import os
import tempfile
import time
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_moe  # noqa: E402

NUM_EXPERTS = 8
NUM_CLUSTERS = 8
HIDDEN = 16
TOKENS = 16
OFFSET_NORM = 6.0  # the shared input offset that makes the router collapse
RUNS = ("no balancing", "load-balancing loss", "bias balancer")


def make_data(samples, seed):
    """Tokens `offset + center_c + noise`; target `(x - offset) @ map_c`."""
    rng = np.random.default_rng(0)  # the task itself is fixed; `seed` draws samples
    offset = rng.standard_normal(HIDDEN)
    offset *= OFFSET_NORM / np.linalg.norm(offset)
    centers = rng.standard_normal((NUM_CLUSTERS, HIDDEN))
    maps = rng.standard_normal((NUM_CLUSTERS, HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)
    draw = np.random.default_rng(seed)
    cluster = draw.integers(0, NUM_CLUSTERS, (samples, TOKENS))
    x = offset + centers[cluster] + 0.3 * draw.standard_normal((samples, TOKENS, HIDDEN))
    y = np.einsum("ntd,ntde->nte", x - offset, maps[cluster])
    return x.astype("float32"), y.astype("float32")


def build_model(load_balance_loss_weight):
    keras.utils.set_random_seed(0)  # the same initialization for every run
    inputs = keras.Input((TOKENS, HIDDEN))
    moe = keras_moe.layers.SparseMoE(
        NUM_EXPERTS, 32, top_k=1, normalize_top_k=False, capacity_factor=1.25,
        eval_capacity_factor=2.0, load_balance_loss_weight=load_balance_loss_weight, name="moe",
    )
    model = keras.Model(inputs, moe(inputs))
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    return model


def train(run, data, epochs):
    (x, y), validation = data
    if run == "load-balancing loss":
        model = build_model(0.1)
        # Built with a non-zero weight, so the loss is part of the compiled
        # step; the schedule then moves the weight without recompiling.
        extra = [keras_moe.callbacks.AuxLossScheduler(
            {"load_balance": keras_moe.callbacks.linear_schedule(0.1, 0.01, duration=3, delay=6)}
        )]
    else:
        model = build_model(0.0)
        extra = [keras_moe.callbacks.ExpertBiasBalancer(1e-2)] if run == "bias balancer" else []
    monitor = keras_moe.callbacks.RouterMonitor()
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        history = model.fit(x, y, validation_data=validation, batch_size=64, epochs=epochs,
                            verbose=0, callbacks=[monitor, *extra])
    alarms = [str(w.message) for w in caught if "RouterMonitor" in str(w.message)]
    return model, monitor, history.history, alarms, time.time() - start


def print_run(run, logs, alarms, seconds):
    print(f"\n## {run} ({seconds:.0f} s)\n")
    print("| epoch | loss | val MSE | max/mean load | dropped | router entropy | lb loss |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for e in range(len(logs["loss"])):
        print(f"| {e + 1} | {logs['loss'][e]:.4f} | {logs['val_loss'][e]:.4f} "
              f"| {logs['moe/load_max_mean_ratio'][e]:.2f} | {logs['moe/dropped_fraction'][e]:.1%} "
              f"| {logs['moe/router_entropy'][e]:.3f} | {logs['moe/load_balance_loss'][e]:.3f} |")
    # The first alarm of each kind (RouterMonitor repeats drop alarms per epoch).
    for kind in ("received less than", "dropped"):
        first = [alarm for alarm in alarms if kind in alarm][:1]
        for alarm in first:
            print(f"\nRouterMonitor warned: {alarm.split(': ', 1)[1]}")
    if alarms:
        print(f"({len(alarms)} warnings in all)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny data, 2 epochs")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out-dir", default=None, help="where the PNG files go")
    args = parser.parse_args(argv)
    samples, epochs = (2048, args.epochs) if not args.smoke else (128, 2)
    out_dir = args.out_dir or (tempfile.mkdtemp() if args.smoke else os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "assets"))
    os.makedirs(out_dir, exist_ok=True)
    print(f"backend: {keras.backend.backend()}, {samples} training samples of {TOKENS} tokens, "
          f"{epochs} epochs, {NUM_EXPERTS} experts, top-1, capacity factor 1.25 / 2.0")
    data = (make_data(samples, seed=1), make_data(max(samples // 4, 64), seed=2))

    records, final, models = {}, {}, {}
    for run in RUNS:
        model, monitor, logs, alarms, seconds = train(run, data, epochs)
        print_run(run, logs, alarms, seconds)
        records[run] = monitor.history["moe"]
        models[run] = model
        load = monitor.history["moe"]["expert_load"][-1]
        final[run] = (logs["val_loss"][-1], logs["moe/load_max_mean_ratio"][-1],
                      logs["moe/dropped_fraction"][-1], int((load * NUM_EXPERTS > 0.1).sum()))

    print("\n## Last epoch\n")
    print("| run | val MSE | max/mean load | dropped | experts in use |")
    print("|---|---:|---:|---:|---:|")
    for run, (mse, ratio, dropped, used) in final.items():
        print(f"| {run} | {mse:.4f} | {ratio:.2f} | {dropped:.1%} | {used} of {NUM_EXPERTS} |")

    written = [os.path.join(out_dir, f"monitoring_{name}.png") for name in (
        "expert_load", "dropped", "tokens_collapsed", "tokens_balanced")]
    keras_moe.plot.plot_expert_load(records, path=written[0],
                                    title="Expert load per epoch (1.0 = balanced)")
    keras_moe.plot.plot_dropped_fraction(records, path=written[1],
                                         title="Assignments dropped by capacity (training)")
    # One validation batch through the collapsed and the bias-balanced layer,
    # with the training capacity (so that drops show).
    batch = data[1][0][:4]
    for run, path in (("no balancing", written[2]), ("bias balancer", written[3])):
        _, routing = models[run].get_layer("moe")(batch, training=True, return_routing=True)
        keras_moe.plot.plot_token_assignment(
            routing, max_tokens=48, path=path, title=f"{run}: the first 48 tokens of a batch"
        )
    print("\nfigures: " + ", ".join(written))
    return final


if __name__ == "__main__":
    main()
