"""Speed of keras-hub's MoE blocks before and after `sparsify`, per family.

keras-hub's MoE blocks compute every expert on every token. For each model
family this script builds the family's keras-hub block at a CPU-sized shape
with the family's expert counts (below), converts a copy with the same
weights the way `keras_moe.integrations.keras_hub.sparsify` converts a
decoder's block, checks that both compute the same outputs, and times:

- `forward`: one compiled inference call (JAX `jax.jit` of `stateless_call`;
  TensorFlow `tf.function`, with and without XLA, the faster reported;
  PyTorch eager under `torch.no_grad()`);
- `train`: one training step (forward, backward, Adam update), as
  `benchmarks/layer_speed.py` times it (its step functions are reused).

Keras-hub and keras_moe measurements are interleaved (A B A B ...), so a
busy machine slows both alike; the table gives medians and the machine's
load average while each family ran.

Shapes (`T` tokens, `hidden`, `E` experts, top `k`, expert width `h`,
shared expert width `s`), the published models' expert counts and top-k at a
reduced hidden size:

| family | T | hidden | E | k | h | s | like |
|---|---|---|---|---|---|---|---|
| mixtral | 1024 | 512 | 8 | 2 | 1792 | | Mixtral 8x7B (h/hidden = 3.5) |
| qwen_moe | 1024 | 512 | 60 | 4 | 352 | 1408 | Qwen1.5-MoE-A2.7B |
| qwen3_moe | 1024 | 256 | 128 | 8 | 96 | | Qwen3-30B-A3B |
| qwen3_5_moe | 1024 | 256 | 256 | 8 | 64 | 64 | Qwen3.5-MoE |
| gpt_oss | 1024 | 512 | 32 | 4 | 512 | | gpt-oss-20b |
| gemma4 | 1024 | 256 | 128 | 8 | 88 | | Gemma 4 26B-A4B |

Usage (one process per backend):

    KERAS_BACKEND=jax python benchmarks/keras_hub_speed.py [--smoke] [--families mixtral ...]
        [--repeats N] [--out results.json]
"""

import argparse
import inspect
import json
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
sys.path.insert(0, REPO_ROOT)

# name: (tokens, hidden, experts, top_k, expert width, shared width)
SHAPES = {
    "mixtral": (1024, 512, 8, 2, 1792, 0),
    "qwen_moe": (1024, 512, 60, 4, 352, 1408),
    "qwen3_moe": (1024, 256, 128, 8, 96, 0),
    "qwen3_5_moe": (1024, 256, 256, 8, 64, 64),
    "gpt_oss": (1024, 512, 32, 4, 512, 0),
    "gemma4": (1024, 256, 128, 8, 88, 0),
}
SMOKE_SHAPES = {name: (16, 16, max(4, e // 16), min(k, 2), 8, 8 if s else 0) for name, (_, _, e, k, _, s) in SHAPES.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat (CI check)")
    p.add_argument("--families", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; smoke 1)")
    p.add_argument("--min-time", type=float, default=None, help="seconds per measurement (default 0.25)")
    p.add_argument("--no-train", action="store_true", help="time the forward pass only")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 5
    if args.min_time is None:
        args.min_time = 0.0 if args.smoke else 0.25
    return args


ARGS = parse_args() if __name__ == "__main__" else None

import layer_speed  # noqa: E402  (sets up the backend, imports keras)
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

BACKEND = keras.backend.backend()


class BlockHost(keras.layers.Layer):
    """Holds a keras-hub MoE block where the family's decoder holds it.

    `sparsify` converts decoders; this host stands in for one, so the
    benchmark converts the block by the same code path.
    """

    def __init__(self, attribute, block, **kwargs):
        super().__init__(**kwargs)
        self.attribute = attribute
        setattr(self, attribute, block)

    def build(self, input_shape):
        getattr(self, self.attribute).build(input_shape)

    def call(self, x, training=None):
        block = getattr(self, self.attribute)
        if "training" in inspect.signature(block.call).parameters:
            out = block(x, training=training)
        else:
            out = block(x)
        return out[0] if isinstance(out, (tuple, list)) else out


class Gemma4Host(keras.layers.Layer):
    """Gemma 4's router and expert bank as its decoder block calls them."""

    def __init__(self, router, bank, **kwargs):
        super().__init__(**kwargs)
        self.moe_router, self.moe_expert_bank = router, bank

    def build(self, input_shape):
        self.moe_router.build(input_shape)
        self.moe_expert_bank.build(input_shape)

    def call(self, x):
        # The decoder normalizes the expert bank's input; that norm is not
        # part of the MoE and is left out on both sides.
        weights = self.moe_router(x)
        out = self.moe_expert_bank(ops.reshape(x, (-1, ops.shape(x)[-1])), weights)
        return ops.reshape(out, ops.shape(x))


def keras_hub_host(family, hidden, experts, top_k, width, shared):
    from keras_hub.src.models.gemma4 import gemma4_moe
    from keras_hub.src.models.gpt_oss.gpt_oss_decoder import GptOssSparseMoeBlock
    from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock
    from keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_decoder import Qwen3_5MoeSparseMoeBlock
    from keras_hub.src.models.qwen3_moe.qwen3_moe_decoder import Qwen3SparseMoeBlock
    from keras_hub.src.models.qwen_moe.qwen_moe_decoder import QwenSparseMoeBlock

    common = dict(hidden_dim=hidden, num_experts=experts, top_k=top_k)
    if family == "mixtral":
        return BlockHost("_sparse_moe_block", MixtralSparseMoeBlock(intermediate_dim=width, **common))
    if family == "qwen_moe":
        return BlockHost("mlp", QwenSparseMoeBlock(
            moe_intermediate_dim=width, shared_expert_intermediate_dim=shared,
            norm_top_k_prob=False, **common))
    if family == "qwen3_moe":
        return BlockHost("mlp", Qwen3SparseMoeBlock(
            moe_intermediate_dim=width, norm_top_k_prob=True, **common))
    if family == "qwen3_5_moe":
        return BlockHost("mlp", Qwen3_5MoeSparseMoeBlock(
            moe_intermediate_dim=width, shared_expert_intermediate_size=shared, **common))
    if family == "gpt_oss":
        return BlockHost("sparse_moe_block", GptOssSparseMoeBlock(intermediate_dim=width, **common))
    if family == "gemma4":
        return Gemma4Host(
            gemma4_moe.Gemma4Router(num_experts=experts, num_experts_per_token=top_k),
            gemma4_moe.Gemma4MoEBlock(
                num_experts=experts, hidden_dim=hidden, expert_intermediate_dim=width
            ),
        )
    raise ValueError(family)


def hosts(family, shape, seed):
    """The keras-hub host and its converted copy, with the same random weights."""
    from keras_moe.integrations.keras_hub.sparsify import _sparsify_decoder

    tokens, hidden, experts, top_k, width, shared = shape
    hub = keras_hub_host(family, hidden, experts, top_k, width, shared)
    hub.build((None, None, hidden))
    # keras-hub initializes some experts to zero (Gemma 4): unit-scale random
    # weights make routing, and so the load on each expert, realistic.
    rng = np.random.default_rng(seed)
    for v in hub.weights:
        s = tuple(v.shape)
        value = rng.standard_normal(s) / np.sqrt(s[-2]) if len(s) >= 2 else 1 + 0.1 * rng.standard_normal(s)
        v.assign(value.astype("float32"))
    sparse = keras_hub_host(family, hidden, experts, top_k, width, shared)
    sparse.build((None, None, hidden))
    sparse.set_weights(hub.get_weights())
    _sparsify_decoder(sparse, {})
    return hub, sparse


def make_forward(layer, x):
    """A compiled inference call; returns `(step, info)`."""
    info = {}
    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        start = time.perf_counter()
        compiled = jax.jit(
            lambda t, n, x: layer.stateless_call(t, n, x)[0]
        ).lower(trainable, non_trainable, x).compile()
        info["compile_s"] = time.perf_counter() - start
        return (lambda: compiled(trainable, non_trainable, x)), info
    if BACKEND == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda x: layer(x), jit_compile=True)
        try:
            fn(x)
            info["tf_mode"] = "xla"
        except Exception:  # noqa: BLE001  (some keras-hub blocks do not compile)
            fn = tf.function(lambda x: layer(x), jit_compile=False)
            info["tf_mode"] = "graph"
        return (lambda: fn(x)), info
    import torch

    def step():
        with torch.no_grad():
            return layer(x)

    return step, info


def make_train(layer, x):
    optimizer = keras.optimizers.Adam(learning_rate=1e-4)
    optimizer.build(layer.trainable_variables)
    if BACKEND == "jax":
        step, _, info = layer_speed.make_jax_step(layer, optimizer, x, memory=False)
    elif BACKEND == "tensorflow":
        step, _, info = layer_speed.make_tf_step(layer, optimizer, x, jit_compile=False)
    else:
        step, _, info = layer_speed.make_torch_step(layer, optimizer, x, compiled=False)
    return step, info


def timed(step, n):
    start = time.perf_counter()
    for _ in range(n):
        out = step()
    layer_speed.block(out)
    return (time.perf_counter() - start) / n


def bench_family(family, args):
    shape = (SMOKE_SHAPES if args.smoke else SHAPES)[family]
    tokens, hidden = shape[0], shape[1]
    load_start = os.getloadavg()[0]
    keras.utils.set_random_seed(0)
    hub, sparse = hosts(family, shape, seed=0)
    x = ops.convert_to_tensor(np.random.default_rng(1).standard_normal((1, tokens, hidden)).astype("float32"))
    max_diff = float(np.abs(ops.convert_to_numpy(hub(x)) - ops.convert_to_numpy(sparse(x))).max())
    row = {"family": family, "shape": dict(zip(("tokens", "hidden", "experts", "top_k", "width", "shared"), shape)),
           "max_abs_diff": max_diff}
    kinds = ["forward"] + ([] if args.no_train else ["train"])
    for kind in kinds:
        steps = {}
        for name, layer in (("keras_hub", hub), ("keras_moe", sparse)):
            make = make_forward if kind == "forward" else make_train
            step, info = make(layer, x)
            layer_speed.block(step())  # compile
            first = timed(step, 1)
            steps[name] = (step, max(1, int(np.ceil(args.min_time / max(first, 1e-6)))) if args.min_time else 1)
            row[f"{kind}_{name}_info"] = info
        times = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, (step, n) in steps.items():
                times[name].append(timed(step, n))
        for name in steps:
            row[f"{kind}_{name}_ms"] = 1e3 * statistics.median(times[name])
            row[f"{kind}_{name}_all_ms"] = [1e3 * t for t in times[name]]
        row[f"{kind}_speedup"] = row[f"{kind}_keras_hub_ms"] / row[f"{kind}_keras_moe_ms"]
    row["load_average"] = [round(load_start, 1), round(os.getloadavg()[0], 1)]
    return row


def markdown(results):
    dev = results["device"]
    out = [
        f"### {dev['backend']} — {dev['device']} ({dev['framework']}, keras {dev['keras']}, "
        f"keras-hub {dev['keras_hub']}, keras-moe {dev['keras_moe']})",
        "",
        f"Median of {results['repeats']} interleaved repeats. `load` is the 1-minute load "
        f"average when the family started / ended ({os.cpu_count()} CPU threads).",
        "",
        "| family | T, hidden, E, k, h | forward keras-hub ms | forward keras_moe ms | speed-up "
        "| train keras-hub ms | train keras_moe ms | speed-up | max abs diff | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        s = r["shape"]
        train = (
            [f"{r['train_keras_hub_ms']:.1f}", f"{r['train_keras_moe_ms']:.1f}", f"{r['train_speedup']:.2f}x"]
            if "train_speedup" in r else ["—"] * 3
        )
        out.append(
            f"| {r['family']} | {s['tokens']}, {s['hidden']}, {s['experts']}, {s['top_k']}, {s['width']} "
            f"| {r['forward_keras_hub_ms']:.1f} | {r['forward_keras_moe_ms']:.1f} "
            f"| {r['forward_speedup']:.2f}x | " + " | ".join(train)
            + f" | {r['max_abs_diff']:.1e} | {r['load_average'][0]} / {r['load_average'][1]} |"
        )
    return "\n".join(out)


def main(args):
    results = {"device": layer_speed.device_description(), "repeats": args.repeats, "rows": []}
    for family in args.families:
        start = time.perf_counter()
        row = bench_family(family, args)
        results["rows"].append(row)
        print(
            f"{family}: forward {row['forward_speedup']:.2f}x"
            + (f", train {row['train_speedup']:.2f}x" if "train_speedup" in row else "")
            + f", max abs diff {row['max_abs_diff']:.1e}, load {row['load_average']} "
            f"({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    print()
    print(markdown(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    bad = [r["family"] for r in results["rows"] if not r["max_abs_diff"] < 1e-3]
    if bad:
        print(f"outputs differ for {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
