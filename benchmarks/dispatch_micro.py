"""Micro-benchmark of dropless dispatch's data movement, function by function.

MegaBlocks-style: each named function of `keras_moe.dispatch` is timed on its
own, forward and forward + backward, so that a regression in one of them
shows without a full training step (`layer_speed.py`):

- `plan_rows`: the routing plan (one stable sort of the `N = T k`
  assignments, then index arithmetic).
- `gather_rows` / `combine_rows`: tokens -> per-expert rows `(R, d)` and
  back (each one's backward pass is the other).
- `gather_matmul`: the first projections (gate and up) fused with the
  gather, the strategy's expert loop.
- `matmul_combine`: the SwiGLU activation and the weighted down projection
  fused with the combine.
- `dense_matmuls` (reference): the same FLOPs as `gather_matmul` as one
  dense `(T, d) @ (d, 2 k h)` matmul.

Compiled like `layer_speed.py` (JAX `jit`, TensorFlow `tf.function` with and
without XLA, PyTorch eager), interleaved repeats, medians, the load average
beside each figure; writes markdown and JSON to `--results-dir`.

    KERAS_BACKEND=jax python benchmarks/dispatch_micro.py [--smoke]
        [--configs e8k2 e32k4 e64k8] [--strategy scan] [--repeats N]
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import layer_speed as common  # noqa: E402  (device, load, synchronisation helpers)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from keras_moe import dispatch  # noqa: E402

BACKEND = common.BACKEND
CONFIGS = {name: common.CONFIGS[name] for name in ("e8k2", "e32k4", "e64k8")}
SMOKE_CONFIGS = {name: common.SMOKE_CONFIGS[name] for name in CONFIGS}
FUNCTIONS = [
    "plan_rows",
    "gather_rows",
    "combine_rows",
    "gather_matmul",
    "matmul_combine",
    "dense_matmuls",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat (CI check)")
    p.add_argument("--configs", nargs="+", default=None, choices=sorted(CONFIGS))
    p.add_argument(
        "--strategy",
        default=None,
        choices=dispatch.STRATEGIES,
        help="dropless strategy (default: keras_moe.dispatch.default_strategy())",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; smoke 1)")
    p.add_argument("--min-time", type=float, default=None, help="seconds per measurement (0.2)")
    p.add_argument(
        "--tf-mode",
        default=None,
        choices=["graph", "xla"],
        help="TensorFlow: tf.function without (graph, default) or with XLA",
    )
    p.add_argument("--results-dir", default=None, help=f"default {common.RESULTS_DIR}; smoke: none")
    p.add_argument("--tag", default=None, help="suffix of the result file names")
    args = p.parse_args(argv)
    args.configs = args.configs or (["e8k2"] if args.smoke else list(CONFIGS))
    args.repeats = args.repeats or (1 if args.smoke else 7)
    args.min_time = (0.0 if args.smoke else 0.2) if args.min_time is None else args.min_time
    args.tf_mode = args.tf_mode or "graph"
    if args.results_dir is None and not args.smoke:
        args.results_dir = common.RESULTS_DIR
    return args


# ----------------------------------------------------------------------------
# Compiled callables: `compile_fn(fn, args)` returns `run()`.


def compile_fn(fn, args, grad_argnums, tf_mode):
    """`run()` of `fn(*args)` (forward) or of its gradients w.r.t. `grad_argnums`.

    The gradients are those of `sum(fn(*args) * upstream)` with a random
    `upstream`, so that no part of the backward pass folds away.
    """
    if grad_argnums:
        shape = tuple(ops.shape(fn(*args)))
        upstream = np.random.default_rng(1).standard_normal(shape).astype("float32")
        fn = (lambda f: lambda *a: ops.multiply(f(*a), upstream))(fn)
    if BACKEND == "jax":
        import jax

        if grad_argnums:
            target = jax.grad(lambda *a: ops.sum(fn(*a)), argnums=grad_argnums)
        else:
            target = fn
        compiled = jax.jit(target).lower(*args).compile()
        return lambda: compiled(*args)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        args = [tf.constant(a) for a in args]

        @tf.function(jit_compile=tf_mode == "xla")
        def step(*a):
            if not grad_argnums:
                return fn(*a)
            with tf.GradientTape() as tape:
                for i in grad_argnums:
                    tape.watch(a[i])
                value = ops.sum(fn(*a))
            return tape.gradient(value, [a[i] for i in grad_argnums])

        return lambda: step(*args)
    import torch

    args = [torch.as_tensor(np.asarray(a)) for a in args]

    def run():
        if not grad_argnums:
            with torch.no_grad():
                return fn(*args)
        leaves = [a.detach().requires_grad_(i in grad_argnums) for i, a in enumerate(args)]
        ops.sum(fn(*leaves)).backward()
        return [leaves[i].grad for i in grad_argnums]

    return run


def block_all(value):
    if BACKEND == "tensorflow":
        for v in value if isinstance(value, (list, tuple)) else [value]:
            v.numpy()
    else:
        common.block(value)


# ----------------------------------------------------------------------------


def make_cases(config, strategy, rng):
    """`{(function, pass): (fn, args, grad_argnums)}` for one config."""
    batch, seq, hidden, num_experts, top_k, width, _ = config
    tokens = batch * seq
    logits = rng.standard_normal((tokens, num_experts)).astype("float32")
    indices = np.argsort(-logits, axis=-1)[:, :top_k].astype("int32")  # distinct experts
    valid = np.ones((tokens, top_k), bool)
    num = tokens * top_k
    block_size = {"ranges": 1, "grouped": 8}.get(strategy) or dispatch.block_size_for(
        num, num_experts
    )
    plan = dispatch.plan_rows(indices, valid, num_experts, block_size)
    rows = int(ops.shape(plan.row_tokens)[0])

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype("float32")

    x = normal(tokens, hidden)
    y_rows = normal(rows, hidden)
    up = normal(num_experts, hidden, width, scale=hidden**-0.5)
    gate = normal(num_experts, hidden, width, scale=hidden**-0.5)
    down = normal(num_experts, width, hidden, scale=width**-0.5)
    first = [normal(rows, width), normal(rows, width)]
    weights = np.asarray(
        ops.convert_to_numpy(dispatch.row_weights(rng.random((tokens, top_k)).astype("float32"), plan))
    )
    dense = normal(hidden, 2 * top_k * width, scale=hidden**-0.5)

    def swiglu(u, g):
        return keras.activations.silu(g) * u

    cases = {
        ("plan_rows", "fwd"): (
            lambda i, v: tuple(dispatch.plan_rows(i, v, num_experts, block_size)[:6]),
            [indices, valid],
            (),
        ),
        ("gather_rows", "fwd"): (lambda x: dispatch.gather_rows(x, plan), [x], ()),
        ("gather_rows", "fwd+bwd"): (lambda x: dispatch.gather_rows(x, plan), [x], (0,)),
        ("combine_rows", "fwd"): (lambda y: dispatch.combine_rows(y, plan), [y_rows], ()),
        ("combine_rows", "fwd+bwd"): (lambda y: dispatch.combine_rows(y, plan), [y_rows], (0,)),
        ("gather_matmul", "fwd"): (
            lambda x, u, g: sum(dispatch.gather_matmul(x, [u, g], plan, strategy)),
            [x, up, gate],
            (),
        ),
        ("gather_matmul", "fwd+bwd"): (
            lambda x, u, g: sum(dispatch.gather_matmul(x, [u, g], plan, strategy)),
            [x, up, gate],
            (0, 1, 2),
        ),
        ("matmul_combine", "fwd"): (
            lambda u, g, w, k: dispatch.matmul_combine(
                [u, g], w, k, None, plan, strategy, activation=swiglu
            ),
            [*first, weights, down],
            (),
        ),
        ("matmul_combine", "fwd+bwd"): (
            lambda u, g, w, k: dispatch.matmul_combine(
                [u, g], w, k, None, plan, strategy, activation=swiglu
            ),
            [*first, weights, down],
            (0, 1, 2, 3),
        ),
        ("dense_matmuls", "fwd"): (lambda x, k: ops.matmul(x, k), [x, dense], ()),
        ("dense_matmuls", "fwd+bwd"): (lambda x, k: ops.matmul(x, k), [x, dense], (0, 1)),
    }
    return cases, {"rows": rows, "block_size": block_size, "assignments": num}


def bench_config(name, args, strategy):
    config = (SMOKE_CONFIGS if args.smoke else CONFIGS)[name]
    cases, info = make_cases(config, strategy, np.random.default_rng(0))
    runs, times, loads, errors = {}, {}, {}, {}
    for key, (fn, fn_args, grad_argnums) in cases.items():
        try:
            run = compile_fn(fn, fn_args, grad_argnums, args.tf_mode)
            block_all(run())  # compile, warm up
            start = time.perf_counter()
            block_all(run())
            t = time.perf_counter() - start
            runs[key] = (run, max(1, math.ceil(args.min_time / max(t, 1e-6))) if args.min_time else 1)
            times[key], loads[key] = [], []
        except Exception as e:  # noqa: BLE001
            errors[key] = f"{e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    for _ in range(args.repeats):  # interleaved
        for key, (run, n) in runs.items():
            loads[key].append(common.load_average())
            start = time.perf_counter()
            for _ in range(n):
                out = run()
            block_all(out)
            times[key].append((time.perf_counter() - start) / n)
    batch, seq, hidden, num_experts, top_k, width, _ = config
    rows = []
    for key in cases:
        row = {
            "config": name,
            "function": key[0],
            "pass": key[1],
            "shape": common.shape_of(config),
            "tokens": batch * seq,
            **info,
            "error": errors.get(key),
            "times_ms": [t * 1e3 for t in times.get(key, [])],
            "load_1min": loads.get(key, []),
        }
        if times.get(key):
            row["median_ms"] = statistics.median(times[key]) * 1e3
            row["min_ms"] = min(times[key]) * 1e3
        rows.append(row)
    return rows


def markdown(results):
    dev = results["device"]
    out = [
        f"### {dev['backend']} — {dev['device']} ({dev['framework']}, keras {dev['keras']}, "
        f"keras-moe {dev['keras_moe']})",
        "",
        f"Strategy `{results['strategy']}`"
        + (f", TensorFlow `{results['tf_mode']}`" if dev["backend"] == "tensorflow" else "")
        + f". Median of {results['repeats']} interleaved repeats. Machine: {dev['cpu']}; "
        f"1-minute load average during the runs {common.load_range(results['rows'])}.",
        "",
        "| config | rows R (B) | function | fwd ms | fwd+bwd ms | load |",
        "|---|---|---|---|---|---|",
    ]
    by_key = {(r["config"], r["function"], r["pass"]): r for r in results["rows"]}
    for cfg in dict.fromkeys(r["config"] for r in results["rows"]):
        for function in FUNCTIONS:
            cells = []
            loads = []
            for pass_ in ("fwd", "fwd+bwd"):
                row = by_key.get((cfg, function, pass_))
                if row is None:
                    cells.append("")
                elif "median_ms" in row:
                    cells.append(f"{row['median_ms']:.2f}")
                    loads += [v for v in row["load_1min"] if v is not None]
                else:
                    cells.append(f"failed: {row['error']}")
            any_row = by_key[(cfg, function, "fwd")]
            s = any_row["shape"]
            label = f"{cfg} (T={any_row['tokens']}, E={s['num_experts']}, k={s['top_k']}, h={s['expert_width']})"
            load = f"{statistics.median(loads):.1f}" if loads else "—"
            out.append(
                f"| {label} | {any_row['rows']} ({any_row['block_size']}) | {function} | "
                + " | ".join(cells)
                + f" | {load} |"
            )
    return "\n".join(out)


def main(args):
    strategy = args.strategy or dispatch.default_strategy()
    results = {
        "device": common.device_description(),
        "strategy": strategy,
        "tf_mode": args.tf_mode,
        "repeats": args.repeats,
        "smoke": args.smoke,
        "argv": sys.argv[1:],
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "rows": [],
    }
    for name in args.configs:
        start = time.perf_counter()
        results["rows"] += bench_config(name, args, strategy)
        print(f"{name}: {time.perf_counter() - start:.0f}s", flush=True)
    table = markdown(results)
    print()
    print(table)
    results["markdown"] = table
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        parts = ["dispatch", common.device_slug(results["device"]), BACKEND]
        if BACKEND == "tensorflow":
            parts.append(args.tf_mode)
        if args.tag:
            parts.append(args.tag)
        stem = os.path.join(args.results_dir, "_".join(parts))
        with open(stem + ".md", "w") as f:
            f.write(f"<!-- written by benchmarks/dispatch_micro.py {' '.join(sys.argv[1:])} -->\n\n")
            f.write(table + "\n")
        with open(stem + ".json", "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {stem}.md and .json")
    failed = [r for r in results["rows"] if r["error"]]
    for r in failed:
        print(f"failed: {r['config']} {r['function']} {r['pass']}: {r['error']}", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main(parse_args())
