"""Quickstart: a sparse mixture of experts beats a dense layer of equal active size.

The task is a regression whose rule changes with the input's region: the sign
pattern of the first three coordinates of `x` picks one of 8 regions, and each
region has its own random nonlinear function of all of `x`. A `SparseMoE` with
8 experts (top-2) can give each region its own experts; a dense feed-forward
layer with as many *active* parameters has to fit all 8 functions at once.

The script trains both with `model.fit`, prints their validation losses and
parameter counts, shows which experts each region's inputs are routed to,
then saves the MoE model to a `.keras` file, reloads it and checks that the
reloaded model gives the same outputs (the exit status is 1 if it does not).

Runs on JAX by default; choose another backend with `KERAS_BACKEND`:

    python examples/quickstart.py                  # full run, about a minute on 2 CPU cores
    KERAS_BACKEND=torch python examples/quickstart.py --smoke   # tiny data, 1 epoch
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

INPUT_DIM = 16  # x in R^16
REGION_BITS = 3  # sign pattern of x[:3] -> 8 regions
UNITS_PER_REGION = 32  # each region's rule is a random tanh network of this width
HIDDEN = 32  # model width
NUM_EXPERTS = 8
TOP_K = 2
EXPERT_DIM = 32  # each expert's intermediate width


def make_data(num_samples, rng, rules):
    """`x (n, d)`, `y (n, 1)` and each sample's region `(n,)`."""
    x = rng.normal(size=(num_samples, INPUT_DIM)).astype("float32")
    bits = (x[:, :REGION_BITS] > 0).astype("int64")
    region = bits @ (2 ** np.arange(REGION_BITS))  # (n,) in [0, 2**bits)
    w_in, b_in, w_out = rules  # (R, d, U), (R, U), (R, U)
    hidden = np.tanh(np.einsum("nd,ndu->nu", x, w_in[region]) + b_in[region])
    y = np.sum(hidden * w_out[region], axis=-1, keepdims=True)
    return x, y.astype("float32"), region


def make_rules(rng):
    """One random tanh network `R^d -> R` per region."""
    regions = 2**REGION_BITS
    w_in = rng.normal(size=(regions, INPUT_DIM, UNITS_PER_REGION)) / np.sqrt(INPUT_DIM) * 2.0
    b_in = rng.normal(size=(regions, UNITS_PER_REGION))
    w_out = rng.normal(size=(regions, UNITS_PER_REGION)) / np.sqrt(UNITS_PER_REGION)
    return w_in, b_in, w_out


def build_moe_model():
    model = keras.Sequential(name="moe_model")
    model.add(keras.Input((INPUT_DIM,)))
    model.add(keras.layers.Dense(HIDDEN, name="embed"))  # linear: the router sees x's signs
    model.add(
        keras_moe.layers.SparseMoE(
            num_experts=NUM_EXPERTS,
            intermediate_dim=EXPERT_DIM,
            top_k=TOP_K,
            activation="gelu",
            name="moe",
        )
    )
    model.add(keras.layers.Dense(1, name="head"))
    return model


def moe_active_params(model):
    """Parameters one sample uses: all but the unchosen experts' weights."""
    moe = model.get_layer("moe")
    expert_params = sum(int(np.prod(w.shape)) for w in moe.experts.trainable_weights)
    # The router runs for every token; only TOP_K of the NUM_EXPERTS experts do.
    return model.count_params() - expert_params + expert_params * TOP_K // NUM_EXPERTS


def build_dense_model(min_active_params):
    """Same embedding and head around a dense FFN with at least the MoE's active parameters."""
    # embed + head + FFN(width) = (d*h + h) + (h + 1) + (h*width + width + width*h + h)
    fixed = (INPUT_DIM * HIDDEN + HIDDEN) + (HIDDEN + 1) + HIDDEN
    width = -(-(min_active_params - fixed) // (2 * HIDDEN + 1))
    model = keras.Sequential(name="dense_model")
    model.add(keras.Input((INPUT_DIM,)))
    model.add(keras.layers.Dense(HIDDEN, name="embed"))
    model.add(keras.layers.Dense(width, activation="gelu", name="ffn_up"))
    model.add(keras.layers.Dense(HIDDEN, name="ffn_down"))
    model.add(keras.layers.Dense(1, name="head"))
    return model


def train(model, data, epochs, batch_size):
    x_train, y_train, x_val, y_val = data
    steps = epochs * -(-len(x_train) // batch_size)
    learning_rate = keras.optimizers.schedules.CosineDecay(5e-3, steps, alpha=0.05)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    start = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=epochs,
        batch_size=batch_size,
        verbose=0,
    )
    seconds = time.perf_counter() - start
    # The MoE's fit loss also holds its load-balancing loss; val_loss is plain MSE.
    return history.history["val_loss"][-1], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny data, 1 epoch (CI)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    num_train, num_val, epochs, batch_size = 16384, 4096, 60, 128
    if args.smoke:
        num_train, num_val, epochs, batch_size = 512, 256, 1, 128

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    rules = make_rules(rng)
    x_train, y_train, _ = make_data(num_train, rng, rules)
    x_val, y_val, region_val = make_data(num_val, rng, rules)
    scale = y_train.std()
    y_train, y_val = y_train / scale, y_val / scale  # unit variance: MSE 1.0 = predicting the mean
    data = (x_train, y_train, x_val, y_val)

    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}"
          f"{' (smoke mode)' if args.smoke else ''}")
    moe_model = build_moe_model()
    dense_model = build_dense_model(moe_active_params(moe_model))

    moe_loss, moe_seconds = train(moe_model, data, epochs, batch_size)
    dense_loss, dense_seconds = train(dense_model, data, epochs, batch_size)

    print(f"\n{'model':<8}{'total params':>14}{'active params':>15}{'val MSE':>10}{'fit s':>8}")
    print(f"{'MoE':<8}{moe_model.count_params():>14,}{moe_active_params(moe_model):>15,}"
          f"{moe_loss:>10.4f}{moe_seconds:>8.1f}")
    print(f"{'dense':<8}{dense_model.count_params():>14,}{dense_model.count_params():>15,}"
          f"{dense_loss:>10.4f}{dense_seconds:>8.1f}")
    print(f"(MoE: top-{TOP_K} of {NUM_EXPERTS} experts of width {EXPERT_DIM}; "
          f"dense: one FFN of width {dense_model.get_layer('ffn_up').units})")
    if args.smoke:
        print("(smoke mode: too little training for the losses to mean anything)")
    else:
        print(f"The MoE's validation MSE is {dense_loss / moe_loss:.2f}x lower than the dense model's.")

    # Routing statistics: call the MoE layer on the validation set's hidden
    # states (the embedding's output) with `return_routing=True`.
    moe = moe_model.get_layer("moe")
    hidden = moe_model.get_layer("embed")(x_val)
    _, routing = moe(hidden, return_routing=True)
    top1 = keras.ops.convert_to_numpy(routing["expert_indices"])[:, 0]  # (n,) best expert
    # The layer also keeps the latest call's assignments per expert.
    load = keras.ops.convert_to_numpy(moe.expert_counts)  # (E,)
    print("\nPer-expert load on the validation set (share of the top-2 assignments):")
    print("  " + "  ".join(f"e{e}:{c / load.sum():5.1%}" for e, c in enumerate(load)))
    print("First-choice expert per input region (rows: region, columns: expert, % of region):")
    print("        " + "".join(f"{f'e{e}':>5}" for e in range(NUM_EXPERTS)))
    for r in range(2**REGION_BITS):
        counts = np.bincount(top1[region_val == r], minlength=NUM_EXPERTS)
        share = 100 * counts / max(1, counts.sum())
        print(f"  r{r}:  " + "".join(f"{s:5.0f}" for s in share))

    # Save, reload, and check the reloaded model computes the same function.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "quickstart_moe.keras")
        moe_model.save(path)
        reloaded = keras.models.load_model(path)
    before = moe_model.predict(x_val, verbose=0)
    after = reloaded.predict(x_val, verbose=0)
    max_diff = float(np.max(np.abs(before - after)))
    print(f"\nSaved and reloaded {os.path.basename(path)}: max |difference| = {max_diff:.2e}")
    if not max_diff <= 1e-6:
        print("FAILED: the reloaded model's outputs differ.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
