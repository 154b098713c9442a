"""MMoE's synthetic-data experiment (Ma et al., KDD 2018, section 3.2).

Two regression tasks whose correlation is set by the cosine `p` of their
weight vectors. The paper's finding: as `p` falls, a shared-bottom model
degrades, while MMoE (one gate per task) stays good; OMoE (one gate shared
by both tasks) sits in between. This script regenerates the data, trains the
three models with roughly equal parameter counts over several seeds, draws
the test-loss curves per model and correlation (the paper's Figure 4) and
prints a markdown table of the final test losses.

Data, for each seed (paper section 3.2):

- `u1, u2`: random orthogonal unit vectors in R^d; `w1 = c * u1`,
  `w2 = c * (p * u1 + sqrt(1 - p**2) * u2)`, so `cos(w1, w2) = p`.
- `x ~ N(0, I_d)`;
  `y_i = w_i . x + sum_{j=1..m} sin(alpha_j * (w_i . x) + beta_j) + eps_i`,
  `eps_i ~ N(0, 0.01)` (variance 0.01).

Constants the paper leaves open, fixed here (also printed by the script):

- `c = 1` (`--scale`), `m = 30` (`--num-sines`), `alpha_j, beta_j ~ N(0, 1)`
  drawn once (numpy seed 0) and kept for every run and both tasks: the
  paper calls them "given parameters". Redrawing them per seed makes the
  task's difficulty swing by an order of magnitude from seed to seed. With
  `m = 10` the tasks are easy enough that OMoE and MMoE tie; 30 sine terms
  make each task's function of `w_i . x` wiggly enough to need the capacity
  that one gate per task frees.
- 10,000 training and 2,000 test samples per seed and correlation. A seed
  draws `u1, u2`, `x`, the noise and the initialization; within a seed the
  correlations differ only through `w2`.
- Each task's labels are standardized with the training mean and standard
  deviation, so a test MSE of 1.0 is as good as predicting the mean.
- Adam with learning rate 3e-3 decayed along a cosine to 1% of it
  (`--no-decay` keeps it constant), batch size 128, 30 epochs (2,370
  steps), the mean squared error of each task with weight 1.
- Models (d = 100): MMoE with 8 experts of one 16-unit ReLU layer and one
  linear softmax gate per task, zero-initialized so that it starts as the
  uniform mixture (the library default); OMoE the same with a single gate; a
  shared-bottom ReLU layer sized so its parameter count is closest to
  MMoE's. All three have per-task towers of one 8-unit ReLU layer and a
  linear output.
- 10 seeds (data and initialization) per model and correlation.
- The reported loss is the test MSE averaged over the two tasks; the models
  are also compared seed by seed (same data, same correlation).

Runs on JAX by default; choose another backend with `KERAS_BACKEND`:

    python examples/mmoe_synthetic.py                  # full run: 10 seeds x 3 correlations x 3 models
    KERAS_BACKEND=torch python examples/mmoe_synthetic.py --smoke   # tiny data, 1 seed, 1 epoch

The figure goes to `--out` (default `docs/assets/mmoe_synthetic.png`; a
temporary file in smoke mode).

References:
    Ma et al., 2018. Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts. https://dl.acm.org/doi/10.1145/3219819.3220007
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_moe  # noqa: E402

INPUT_DIM = 100  # d
SCALE = 1.0  # c, the default of --scale
NUM_SINES = 30  # m
SINE_SEED = 0  # alpha, beta ~ N(0, 1), drawn once from this seed
NOISE_STD = 0.1  # eps ~ N(0, 0.01)
CORRELATIONS = (0.5, 0.9, 1.0)  # p
NUM_EXPERTS = 8
EXPERT_UNITS = 16
TOWER_UNITS = 8
MODELS = ("Shared-Bottom", "OMoE", "MMoE")
TASKS = {"task_1": "regression", "task_2": "regression"}


def sine_params(num_sines=NUM_SINES):
    """The paper's "given parameters" `alpha, beta (m,)`, the same for every run."""
    rng = np.random.default_rng(SINE_SEED)
    return rng.normal(size=num_sines), rng.normal(size=num_sines)


def make_data(p, seed, train_size, test_size, scale=SCALE, num_sines=NUM_SINES):
    """Train and test `x (n, d)` and labels `{task_i: (n, 1)}`.

    `seed` draws `u1, u2`, `x` and the noise; within a seed the correlations
    differ only through `w2`.
    """
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(INPUT_DIM, 2)))  # orthonormal columns
    u1, u2 = u[:, 0], u[:, 1]
    w = scale * np.stack([u1, p * u1 + np.sqrt(1.0 - p**2) * u2])  # (2, d)
    alpha, beta = sine_params(num_sines)
    x = rng.normal(size=(train_size + test_size, INPUT_DIM))
    z = x @ w.T  # (n, 2): w_i . x
    sines = np.sin(alpha * z[..., None] + beta).sum(axis=-1)  # (n, 2)
    y = z + sines + rng.normal(scale=NOISE_STD, size=z.shape)
    # Standardize each task with the training statistics: MSE 1.0 is then
    # as good as predicting the mean.
    y = (y - y[:train_size].mean(axis=0)) / y[:train_size].std(axis=0)
    x, y = x.astype("float32"), y.astype("float32")
    split = lambda a: (a[:train_size], a[train_size:])  # noqa: E731
    (x_train, x_test), (y_train, y_test) = split(x), split(y)
    labels = lambda a: {name: a[:, i : i + 1] for i, name in enumerate(TASKS)}  # noqa: E731
    return x_train, labels(y_train), x_test, labels(y_test)


def shared_bottom_units(target_params):
    """The shared-bottom width whose model is closest to `target_params`."""

    def count(units):  # bottom + per task: tower (units -> 8) and head (8 -> 1)
        tower = (units + 1) * TOWER_UNITS + (TOWER_UNITS + 1)
        return (INPUT_DIM + 1) * units + len(TASKS) * tower

    return min(range(1, 4 * target_params // INPUT_DIM), key=lambda h: abs(count(h) - target_params))


def build_model(kind, bottom_units):
    if kind == "MMoE":
        mixture = keras_moe.layers.MMoE(len(TASKS), NUM_EXPERTS, EXPERT_UNITS, name="mmoe")
    elif kind == "OMoE":  # one gate, its mixture shared by both towers
        mixture = keras_moe.layers.MMoE(1, NUM_EXPERTS, EXPERT_UNITS, name="omoe")
    else:
        mixture = keras.layers.Dense(bottom_units, activation="relu", name="shared_bottom")
    return keras_moe.models.MultiTaskModel(
        INPUT_DIM, TASKS, mixture, tower_units=[TOWER_UNITS], name=kind.lower().replace("-", "_")
    )


def train(model, data, epochs, batch_size, learning_rate, decay=False):
    """Test loss (mean over tasks) after each epoch, `(epochs,)`."""
    x_train, y_train, x_test, y_test = data
    if decay:  # cosine decay to 1% over the run
        steps = epochs * -(-len(x_train) // batch_size)
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, steps, alpha=0.01)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss={name: "mse" for name in TASKS},
    )
    history = model.fit(
        x_train,
        y_train,
        validation_data=(x_test, y_test),
        validation_batch_size=len(x_test),
        epochs=epochs,
        batch_size=batch_size,
        verbose=0,
    )
    task_losses = [history.history[f"val_{name}_loss"] for name in TASKS]
    return np.mean(task_losses, axis=0)


def plot(curves, correlations, steps_per_epoch, out, title_suffix=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"Shared-Bottom": "tab:red", "OMoE": "tab:green", "MMoE": "tab:blue"}
    fig, axes = plt.subplots(1, len(correlations), figsize=(4.2 * len(correlations), 3.6), sharey=True)
    for ax, p in zip(np.atleast_1d(axes), correlations):
        for kind in MODELS:
            runs = np.asarray(curves[kind][p])  # (seeds, epochs)
            steps = steps_per_epoch * np.arange(1, runs.shape[1] + 1)
            mean, std = runs.mean(axis=0), runs.std(axis=0)
            ax.plot(steps, mean, label=kind, color=colors[kind], marker=".")
            ax.fill_between(steps, mean - std, mean + std, color=colors[kind], alpha=0.15)
        ax.set_title(f"correlation p = {p}")
        ax.set_xlabel("training steps")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("test MSE (mean of 2 tasks)")
    np.atleast_1d(axes)[-1].legend()
    fig.suptitle(f"MMoE synthetic experiment{title_suffix}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny data, 1 seed, 1 epoch (CI)")
    parser.add_argument(
        "--out",
        default=None,
        help="path of the figure (default: docs/assets/mmoe_synthetic.png; with --smoke, a temporary file)",
    )
    parser.add_argument("--scale", type=float, default=SCALE, help="c, the norm of w1 and w2")
    parser.add_argument("--num-sines", type=int, default=NUM_SINES, help="m, the number of sine terms")
    parser.add_argument(
        "--correlations",
        default=",".join(str(p) for p in CORRELATIONS),
        help="comma-separated task correlations p",
    )
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--test-size", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument(
        "--decay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cosine decay of the learning rate to 1%% over the run",
    )
    args = parser.parse_args()
    correlations = [float(p) for p in args.correlations.split(",")]
    if args.smoke:
        args.seeds, args.epochs, args.train_size, args.test_size = 1, 1, 256, 128
    if args.out is None:  # a smoke run must not overwrite the docs' figure
        args.out = (
            os.path.join(tempfile.gettempdir(), "mmoe_synthetic_smoke.png")
            if args.smoke
            else "docs/assets/mmoe_synthetic.png"
        )

    steps_per_epoch = -(-args.train_size // args.batch_size)
    param_counts = {}
    reference = build_model("MMoE", None)
    bottom = shared_bottom_units(reference.count_params())
    for kind in MODELS:
        param_counts[kind] = build_model(kind, bottom).count_params()

    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}"
          f"{' (smoke mode)' if args.smoke else ''}")
    print("Constants: "
          f"d = {INPUT_DIM}, c = {args.scale:g}, m = {args.num_sines}, "
          f"alpha_j, beta_j ~ N(0, 1) drawn once (seed {SINE_SEED}): "
          f"alpha = {np.round(sine_params(args.num_sines)[0], 2).tolist()}, beta = {np.round(sine_params(args.num_sines)[1], 2).tolist()}; "
          f"noise variance {NOISE_STD**2:g}; labels standardized per task; {args.train_size} train / {args.test_size} test samples; "
          f"Adam lr {args.learning_rate:g}{' (cosine decay)' if args.decay else ''}, batch {args.batch_size}, {args.epochs} epochs "
          f"({args.epochs * steps_per_epoch} steps); {args.seeds} seed(s); loss = test MSE averaged over the 2 tasks.")
    print(f"Models: {NUM_EXPERTS} experts x {EXPERT_UNITS} units, towers of {TOWER_UNITS}, "
          f"shared bottom of {bottom} units.")
    print("Parameters: " + ", ".join(f"{kind} {count:,}" for kind, count in param_counts.items()))

    curves = {kind: {p: [] for p in correlations} for kind in MODELS}
    label_corr = {p: [] for p in correlations}
    start = time.perf_counter()
    for p in correlations:
        for seed in range(args.seeds):
            data = make_data(p, seed, args.train_size, args.test_size, args.scale, args.num_sines)
            y_train = data[1]
            label_corr[p].append(np.corrcoef(y_train["task_1"][:, 0], y_train["task_2"][:, 0])[0, 1])
            for kind in MODELS:
                keras.utils.set_random_seed(seed)
                model = build_model(kind, bottom)
                curves[kind][p].append(train(model, data, args.epochs, args.batch_size, args.learning_rate, args.decay))
            print(f"  p = {p}, seed {seed}: "
                  + ", ".join(f"{kind} {curves[kind][p][-1][-1]:.4f}" for kind in MODELS)
                  + f"  ({time.perf_counter() - start:.0f}s)", flush=True)

    print("\nPearson correlation of the two tasks' labels: "
          + ", ".join(f"p = {p}: {np.mean(label_corr[p]):.2f}" for p in correlations))
    print(f"\nFinal test MSE (mean of the 2 tasks), mean ± std over {args.seeds} seed(s), "
          f"after {args.epochs * steps_per_epoch} steps:\n")
    print("| model | params | " + " | ".join(f"p = {p}" for p in correlations) + " |")
    print("|---|---:|" + "---:|" * len(correlations))
    for kind in MODELS:
        cells = []
        for p in correlations:
            final = np.asarray(curves[kind][p])[:, -1]
            cells.append(f"{final.mean():.4f} ± {final.std():.4f}")
        print(f"| {kind} | {param_counts[kind]:,} | " + " | ".join(cells) + " |")

    print("\nMMoE against the others, paired by seed: mean difference of the final test MSE "
          "(other - MMoE) ± its standard error, and the seeds where MMoE's loss is lower:\n")
    print("| model | " + " | ".join(f"p = {p}" for p in correlations) + " |")
    print("|---|" + "---:|" * len(correlations))
    for kind in MODELS:
        if kind == "MMoE":
            continue
        cells = []
        for p in correlations:
            diff = np.asarray(curves[kind][p])[:, -1] - np.asarray(curves["MMoE"][p])[:, -1]
            sem = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            cells.append(f"{diff.mean():+.4f} ± {sem:.4f} ({(diff > 0).sum()}/{len(diff)})")
        print(f"| {kind} | " + " | ".join(cells) + " |")

    low, high = min(correlations), max(correlations)
    print(f"\nChange of the final test MSE from p = {high} to p = {low} (mean over seeds of the per-seed ratio): "
          + ", ".join(
              f"{kind} {np.mean(np.asarray(curves[kind][low])[:, -1] / np.asarray(curves[kind][high])[:, -1]) - 1:+.0%}"
              for kind in MODELS
          ))

    suffix = f" (c = {args.scale:g}, m = {args.num_sines}, {args.seeds} seed{'s' * (args.seeds > 1)}, mean ± std)"
    plot(curves, correlations, steps_per_epoch, args.out, suffix + (" - smoke run" if args.smoke else ""))
    print(f"\nFigure saved to {args.out} ({time.perf_counter() - start:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
