"""Training-step speed of every router, relative to SparseMoE top-2.

Times one compiled training step of the block `x + layer(LayerNorm(x))` for
each routed layer of keras_moe, side by side in one process, with
interleaved repeats (A B C ... A B C ...) so that a busy machine slows every
layer alike; reports the median step time and its ratio to `top2` (dropless
`SparseMoE(top_k=2)`), prints a markdown table and can save JSON.

Rows (hidden `d`, `E` experts of width `h`, SwiGLU experts everywhere):

| row | layer |
|---|---|
| `top2` | `SparseMoE(top_k=2)`, dropless (the baseline) |
| `switch` | `SwitchFFN`: top-1, capacity factor 1.25, jitter, z-loss |
| `gshard_random` / `gshard_sampling` | `SparseMoE(top_k=2, second_expert_policy=..., capacity_factor=1.25)` |
| `noisy_top2` | `SparseMoE(top_k=2, noisy_gating=True)` |
| `bpr_top2` | `SparseMoE(top_k=2, capacity_factor=1.0, batch_prioritized_routing=True)` |
| `expert_choice` | `ExpertChoiceMoE(capacity_factor=2.0)`, a routing group per sequence |
| `soft_moe` | `SoftMoE` with `E * slots_per_expert = sequence length` |

Step: loss `mean(square(x + layer(LayerNorm(x))))` plus the layer's
auxiliary losses; gradients with respect to the variables and the input `x`
(as inside a deeper model); Adam update. JAX: `jax.jit` of
`stateless_call` + `value_and_grad` + `optimizer.stateless_apply`, compiled
ahead of time. TensorFlow: `tf.function` (`--tf-xla` for `jit_compile=True`).
PyTorch: eager.

    KERAS_BACKEND=jax python benchmarks/router_speed.py [--smoke] [--repeats N]
        [--batch 4 --seq 512 --hidden 256 --experts 8 --width 512] [--out r.json]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["top2", "switch", "gshard_random", "gshard_sampling", "noisy_top2", "bpr_top2",
          "expert_choice", "soft_moe"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat (CI check)")
    p.add_argument("--layers", nargs="+", default=LAYERS, choices=LAYERS)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    p.add_argument("--steps", type=int, default=5, help="steps per timed measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--tf-xla", action="store_true", help="TensorFlow: jit_compile=True")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.hidden, args.experts, args.width = 2, 16, 16, 4, 16
        args.repeats, args.steps, args.warmup = 1, 1, 1
    if "top2" not in args.layers:
        args.layers = ["top2"] + args.layers  # the baseline of the ratios
    return args


ARGS = parse_args() if __name__ == "__main__" else None
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

sys.path.insert(0, REPO_ROOT)
import keras_moe  # noqa: E402

BACKEND = keras.backend.backend()


def make_layer(name, args):
    E, h, seq = args.experts, args.width, args.seq
    ffn = dict(num_experts=E, intermediate_dim=h, gated=True, activation="silu")
    sparse = keras_moe.layers.SparseMoE
    if name == "top2":
        return sparse(top_k=2, **ffn)
    if name == "switch":
        return keras_moe.layers.SwitchFFN(**ffn)
    if name.startswith("gshard_"):
        return sparse(top_k=2, second_expert_policy=name.split("_")[1], capacity_factor=1.25,
                      **ffn)
    if name == "noisy_top2":
        return sparse(top_k=2, noisy_gating=True, **ffn)
    if name == "bpr_top2":
        return sparse(top_k=2, capacity_factor=1.0, batch_prioritized_routing=True, **ffn)
    if name == "expert_choice":
        return keras_moe.layers.ExpertChoiceMoE(capacity_factor=2.0, group_size=seq, **ffn)
    if name == "soft_moe":
        return keras_moe.layers.SoftMoE(slots_per_expert=max(1, seq // E), **ffn)
    raise ValueError(name)


class Block(keras.layers.Layer):
    """`x + layer(LayerNorm(x))`: a pre-norm residual block around the layer."""

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.LayerNormalization()
        self.layer = layer

    def build(self, input_shape):
        self.norm.build(input_shape)
        self.layer.build(input_shape)

    def call(self, x, training=None):
        return x + self.layer(self.norm(x), training=training)


def block(value):
    """Waits until `value` is computed."""
    if BACKEND == "jax":
        import jax

        jax.block_until_ready(value)
    elif BACKEND == "tensorflow":
        value.numpy()
    else:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def make_step(model, optimizer, x, args):
    """A function running one training step; returns something `block` can wait on."""
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        def loss_fn(trainable, non_trainable, x):
            y, non_trainable, losses = model.stateless_call(
                trainable, non_trainable, x, training=True, return_losses=True
            )
            loss = jnp.mean(jnp.square(y.astype("float32")))
            return loss + sum(losses), non_trainable

        def train_step(state, x):
            trainable, non_trainable, opt_vars = state
            (loss, non_trainable), (grads, grad_x) = jax.value_and_grad(
                loss_fn, argnums=(0, 2), has_aux=True
            )(trainable, non_trainable, x)
            trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
            return (loss, grad_x), (trainable, non_trainable, opt_vars)

        state = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in optimizer.variables],
        )
        compiled = jax.jit(train_step, donate_argnums=0).lower(state, x).compile()
        holder = {"state": state}

        def step():
            out, holder["state"] = compiled(holder["state"], x)
            return out

        return step
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.Variable(x)  # watched: its gradient is part of the step

        @tf.function(jit_compile=args.tf_xla)
        def train_step():
            with tf.GradientTape() as tape:
                loss = ops.mean(ops.square(model(x, training=True))) + sum(model.losses)
            variables = model.trainable_variables
            grads = tape.gradient(loss, variables + [x])
            optimizer.apply_gradients(zip(grads[:-1], variables))
            return grads[-1]

        return train_step
    import torch

    x = x.detach().clone().requires_grad_(True)
    variables = model.trainable_variables

    def step():
        loss = ops.mean(ops.square(model(x, training=True))) + sum(model.losses)
        for v in variables:
            v.value.grad = None
        x.grad = None
        loss.backward()
        with torch.no_grad():
            optimizer.apply([v.value.grad for v in variables], variables)
        return x.grad

    return step


def main(args):
    keras.utils.set_random_seed(0)
    x = ops.convert_to_tensor(
        np.random.default_rng(0).standard_normal((args.batch, args.seq, args.hidden)).astype("float32")
    )
    steps = {}
    for name in args.layers:
        model = Block(make_layer(name, args), name=name)
        model.build(x.shape)
        optimizer = keras.optimizers.Adam(1e-4)
        optimizer.build(model.trainable_variables)
        steps[name] = make_step(model, optimizer, x, args)
        for _ in range(args.warmup + 1):  # the first call compiles (TF, torch: traces)
            out = steps[name]()
        block(out)
    times = {name: [] for name in args.layers}
    for _ in range(args.repeats):
        for name in args.layers:  # interleaved: drifts of a shared machine hit all alike
            start = time.perf_counter()
            for _ in range(args.steps):
                out = steps[name]()
            block(out)
            times[name].append((time.perf_counter() - start) / args.steps)
    medians = {name: statistics.median(t) for name, t in times.items()}
    tokens = args.batch * args.seq
    print(f"keras {keras.__version__}, backend {BACKEND}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU threads; T={tokens} tokens (batch {args.batch} x seq {args.seq}), "
          f"hidden {args.hidden}, E={args.experts}, width {args.width}, {args.repeats} repeats"
          f"{' (smoke)' if args.smoke else ''}")
    print("\n| router | step (ms, median) | vs top2 |")
    print("|---|---:|---:|")
    for name in args.layers:
        print(f"| `{name}` | {1000 * medians[name]:.2f} | {medians[name] / medians['top2']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"backend": BACKEND, "args": vars(args), "times_s": times}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
