"""Routing zoo: one small model, every router, the same generated task.

The task: sequences of 16 tokens, each token `x in R^16`; the sign pattern of
a token's first three coordinates picks one of 8 regions, and each region has
its own random nonlinear function of `x` giving the token's target. Experts
that specialize by region fit it best, so the task rewards good routing.

The model is the same for every router: `Dense(32)` embedding, one
pre-norm residual MoE block `h + moe(LayerNorm(h))`, and a `Dense(1)` head,
trained with Adam on the mean squared error. The MoE layer has 8 experts of
width 32 in every row; only the routing differs:

| router | layer |
|---|---|
| `top2` | `SparseMoE(top_k=2)`, dropless softmax top-2 (Mixtral-style) |
| `switch` | `SwitchFFN` (top-1, capacity factor 1.25 / 2.0, jitter, z-loss) |
| `gshard_random` | `SparseMoE(top_k=2, second_expert_policy="random", capacity_factor=1.25)` |
| `gshard_sampling` | the same with `second_expert_policy="sampling"` |
| `noisy_top2` | `SparseMoE(top_k=2, noisy_gating=True)` (Shazeer et al. 2017) |
| `switch_bpr` | `SwitchFFN(batch_prioritized_routing=True)`: capacity to the most confident tokens first |
| `expert_choice` | `ExpertChoiceMoE(capacity_factor=2.0)`, tokens chosen within each sequence |
| `soft_moe` | `SoftMoE(slots_per_expert=2)`: 16 slots for 16 tokens |
| `hash` | `MoE` with a custom router: token position `t -> t mod 8` (Roller et al. 2021) |

Printed per router: the validation MSE (evaluation mode; 1.0 = predicting
the mean); from a training-mode pass over the validation set, the mean
number of experts computed per token (capacity drops and GShard's dropped
second experts lower it; Soft MoE: every expert, on slots), the share of
tokens that got no expert at all (capacity drops; Expert Choice: tokens no
expert picked) and the coefficient of variation of the per-expert load
(std / mean of the assignments each expert computed; Soft MoE: of its soft
load); and the median time of a training step.

    python examples/routing_zoo.py                 # full run, several minutes on 2 CPU cores
    KERAS_BACKEND=torch python examples/routing_zoo.py --smoke    # CI: seconds
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_moe  # noqa: E402
from keras_moe.routers import Router  # noqa: E402
from keras_moe.routers import RoutingPlan  # noqa: E402

SEQ = 16
INPUT_DIM = 16
REGION_BITS = 3
UNITS_PER_REGION = 32
HIDDEN = 32
NUM_EXPERTS = 8
EXPERT_DIM = 32


@keras.saving.register_keras_serializable(package="routing_zoo")
class PositionHashRouter(Router):
    """Token position `t` of each routing group goes to expert `t mod E`, weight 1."""

    @property
    def num_selected(self):
        return 1

    def compute_routing(self, inputs, logits, routed, training):
        groups, tokens = ops.shape(logits)[0], ops.shape(logits)[1]
        experts = ops.arange(tokens, dtype="int32") % self.num_experts
        indices = ops.broadcast_to(ops.reshape(experts, (1, tokens, 1)), (groups, tokens, 1))
        return RoutingPlan(
            expert_indices=indices,
            expert_weights=ops.ones((groups, tokens, 1), "float32"),
            dispatch_mask=ops.expand_dims(routed, -1),
            router_logits=logits,
            router_probs=ops.softmax(logits, axis=-1),
        )


def make_layer(name):
    common = dict(num_experts=NUM_EXPERTS, intermediate_dim=EXPERT_DIM, name="moe")
    sparse = keras_moe.layers.SparseMoE
    if name == "top2":
        return sparse(top_k=2, **common)
    if name == "switch":
        return keras_moe.layers.SwitchFFN(**common)
    if name in ("gshard_random", "gshard_sampling"):
        return sparse(top_k=2, second_expert_policy=name.split("_")[1], capacity_factor=1.25,
                      eval_capacity_factor=2.0, **common)
    if name == "noisy_top2":
        return sparse(top_k=2, noisy_gating=True, load_balance_loss_weight=0.0, **common)
    if name == "switch_bpr":
        return keras_moe.layers.SwitchFFN(batch_prioritized_routing=True, **common)
    if name == "expert_choice":
        return keras_moe.layers.ExpertChoiceMoE(capacity_factor=2.0, group_size=SEQ, **common)
    if name == "soft_moe":
        return keras_moe.layers.SoftMoE(slots_per_expert=SEQ // NUM_EXPERTS, **common)
    if name == "hash":
        return keras_moe.layers.MoE(
            PositionHashRouter(NUM_EXPERTS, trainable=False),  # fixed: nothing to learn
            keras_moe.experts.StackedExperts(NUM_EXPERTS, EXPERT_DIM),
            name="moe",
        )
    raise ValueError(name)


ROUTERS = ["top2", "switch", "switch_bpr", "gshard_random", "gshard_sampling", "noisy_top2",
           "expert_choice", "soft_moe", "hash"]


def make_rules(rng):
    """One random tanh network `R^d -> R` per region."""
    regions = 2**REGION_BITS
    w_in = rng.normal(size=(regions, INPUT_DIM, UNITS_PER_REGION)) / np.sqrt(INPUT_DIM) * 2.0
    b_in = rng.normal(size=(regions, UNITS_PER_REGION))
    w_out = rng.normal(size=(regions, UNITS_PER_REGION)) / np.sqrt(UNITS_PER_REGION)
    return w_in, b_in, w_out


def make_data(num_sequences, rng, rules):
    """`x (n, SEQ, d)` and per-token targets `y (n, SEQ, 1)`."""
    x = rng.normal(size=(num_sequences * SEQ, INPUT_DIM)).astype("float32")
    region = (x[:, :REGION_BITS] > 0).astype("int64") @ (2 ** np.arange(REGION_BITS))
    w_in, b_in, w_out = rules
    hidden = np.tanh(np.einsum("nd,ndu->nu", x, w_in[region]) + b_in[region])
    y = np.sum(hidden * w_out[region], axis=-1, keepdims=True).astype("float32")
    return x.reshape(num_sequences, SEQ, INPUT_DIM), y.reshape(num_sequences, SEQ, 1)


def build_model(name):
    inputs = keras.Input((SEQ, INPUT_DIM))
    h = keras.layers.Dense(HIDDEN, name="embed")(inputs)
    normed = keras.layers.LayerNormalization(name="norm")(h)
    h = h + make_layer(name)(normed)
    outputs = keras.layers.Dense(1, name="head")(h)
    return keras.Model(inputs, outputs, name=name)


class EpochTimer(keras.callbacks.Callback):
    """Wall time of every epoch (the logs are synchronized at its end)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.start)

    def on_train_begin(self, logs=None):
        self.times = []


def routing_statistics(model, x):
    """Experts computed per token, share of tokens without any, load variation.

    Measured in a training-mode call of the MoE layer on `x`'s hidden states.
    """
    layer = model.get_layer("moe")
    normed = keras.Model(model.input, model.get_layer("norm").output)(x)
    if isinstance(layer, keras_moe.layers.SoftMoE):
        layer(normed, training=True)
        per_token, unserved = float(NUM_EXPERTS), 0.0  # every token gets every slot's output
    else:
        _, routing = layer(normed, training=True, return_routing=True)
        dispatched = ops.convert_to_numpy(routing["dispatched"])  # (n, SEQ, k)
        per_token = float(dispatched.sum(-1).mean())
        unserved = float((~dispatched.any(-1)).mean())
    load = ops.convert_to_numpy(layer.expert_counts)
    return per_token, unserved, float(load.std() / max(load.mean(), 1e-12))


def run(name, data, epochs, batch_size, seed):
    keras.utils.set_random_seed(seed)
    x_train, y_train, x_val, y_val = data
    model = build_model(name)
    steps = -(-len(x_train) // batch_size)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    timer = EpochTimer()
    model.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, verbose=0,
              callbacks=[timer])
    # The first epoch compiles; later epochs give the step time.
    epoch_times = timer.times[1:] or timer.times
    step_ms = 1000 * statistics.median(epoch_times) / steps
    val_mse = float(model.evaluate(x_val, y_val, batch_size=256, verbose=0))
    per_token, unserved, load_cv = routing_statistics(model, x_val)
    return {"router": name, "val_mse": val_mse, "per_token": per_token, "unserved": unserved,
            "load_cv": load_cv, "step_ms": step_ms}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny data, 1 epoch (CI)")
    parser.add_argument("--routers", nargs="+", default=ROUTERS, choices=ROUTERS)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    num_train, num_val, epochs, batch_size = 2048, 512, 30, 64
    if args.smoke:
        num_train, num_val, epochs, batch_size = 32, 16, 1, 16
    epochs = args.epochs or epochs

    rng = np.random.default_rng(args.seed)
    rules = make_rules(rng)
    x_train, y_train = make_data(num_train, rng, rules)
    x_val, y_val = make_data(num_val, rng, rules)
    scale = y_train.std()  # unit variance: MSE 1.0 = predicting the mean
    data = (x_train, y_train / scale, x_val, y_val / scale)

    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; {num_train} sequences "
          f"of {SEQ} tokens, {epochs} epochs{' (smoke mode)' if args.smoke else ''}")
    rows = []
    for name in args.routers:
        rows.append(run(name, data, epochs, batch_size, args.seed))
        print(f"  {name}: done", flush=True)
    print()
    print("| router | val MSE | experts / token | tokens without expert | expert-load CV "
          "| step (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        soft = r["router"] == "soft_moe"
        per_token = "all (slots)" if soft else f"{r['per_token']:.2f}"
        print(f"| `{r['router']}` | {r['val_mse']:.4f} | {per_token} | {r['unserved']:.1%} "
              f"| {r['load_cv']:.2f} | {r['step_ms']:.1f} |")
    if args.smoke:
        print("(smoke mode: too little training for the numbers to mean anything)")
    return 0 if all(np.isfinite(r["val_mse"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
