"""Host time of a PyTorch training step: what an eager step costs the CPU that drives a GPU.

Keras runs eagerly on PyTorch: every `keras.ops` call is Python, Keras'
conversions and one or more ATen operators, each dispatched (and on a GPU
launched) by the host. A GPU step is bound by the host when that work takes
longer than the device's kernels; on an H200 the dropless SparseMoE step at
T = 16384 kept the GPU busy 30 of its 42 ms (`performance.md`). This script
measures the host's share where no device is needed: the training step of
`layer_speed.py` (residual block, input gradient, Adam) at tiny shapes on
one CPU thread, where the kernels cost next to nothing, so the time per
step is the host's work. It also counts the outermost ATen operators one
step dispatches, from which a GPU step launches its kernels. Fewer operators and less host time per step carry over to the GPU;
the GPU's own timings need the device (`benchmarks/gpu_run.sh`).

`before experts ms` is the host time from the start of the step to the
experts' first projection. Everything before it (the router, its losses,
the routing plan) is small kernels, so on a GPU the device idles for about
that long in every step; after it the expert matmuls keep the device busy
while the host runs ahead, until the optimizer's syncs.

Layers and strategies as in `layer_speed.py` (`sparse_moe@grouped` is the
H200 default, `@ranges` the CPU one). With `--torch-mode compile` (or
`both`, the default) the whole step also runs through `torch.compile`, as
Keras' `jit_compile=True` runs it, with the strategy `default_strategy()`
picks there. Shapes: `layer_speed.py`'s smoke configs (a few dozen tokens).

    python benchmarks/host_overhead.py [--configs mixtral_half dsv2_lite]
        [--layers dense_ffn sparse_moe@grouped sparse_moe@ranges] [--repeats 7]
        [--results-dir benchmarks/results] [--tag TAG]
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ["KERAS_BACKEND"] = "torch"

DEFAULT_LAYERS = ["dense_ffn", "sparse_moe@grouped", "sparse_moe@ranges"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["mixtral_half", "dsv2_lite"])
    p.add_argument("--layers", nargs="+", default=DEFAULT_LAYERS)
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median reported)")
    p.add_argument("--steps", type=int, default=20, help="steps per round")
    p.add_argument(
        "--torch-mode",
        default="both",
        choices=["eager", "compile", "both"],
        help="eager steps, the whole step through torch.compile (Keras' jit_compile=True), or both",
    )
    p.add_argument("--smoke", action="store_true", help="1 round of 2 steps (CI check)")
    p.add_argument(
        "--results-dir", default=None, help="write cpu_torch_host_overhead[_TAG].{md,json} there"
    )
    p.add_argument("--tag", default=None, help="suffix of the result file names")
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats, args.steps = 1, 2
    return args


def count_operators(step):
    """Outermost ATen operators one call of `step` dispatches.

    Operators called by other operators are not counted: on a GPU the
    outermost ones launch the kernels, while on a CPU some of them run
    further operators (`torch._grouped_mm` loops over the groups there).
    """
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()

    def nested(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not nested(e))


def time_before_experts(step, steps):
    """Median host ms from the start of an eager step to its experts' first projection.

    Until then the step issues only the router's and the routing plan's
    small operators: on a GPU the device idles through that stretch of
    every step (before it, the layer norm; after it, the expert matmuls
    keep the device busy while the host runs ahead). `None` for layers
    without dropless experts.
    """
    from keras_moe.dispatch import grouped

    original = grouped.gather_matmul
    reached = []

    def gather_matmul(*args, **kwargs):
        if not reached:
            reached.append(time.perf_counter())
        return original(*args, **kwargs)

    grouped.gather_matmul = gather_matmul
    times = []
    try:
        for _ in range(steps):
            reached.clear()
            start = time.perf_counter()
            step()
            if reached:
                times.append((reached[0] - start) * 1e3)
    finally:
        grouped.gather_matmul = original
    return statistics.median(times) if times else None


def measure(args):
    import keras
    import torch

    import layer_speed as ls

    torch.set_num_threads(1)
    rows = []
    for config in args.configs:
        batch, seq, hidden, num_experts, top_k, width, shared = ls.SMOKE_CONFIGS[config]
        x = keras.random.normal((batch, seq, hidden), seed=0)
        modes = ["eager", "compile"] if args.torch_mode == "both" else [args.torch_mode]
        candidates = []
        for mode in modes:
            names = args.layers
            if mode == "compile":
                # Under torch.compile the strategy is default_strategy()'s.
                names = list(dict.fromkeys(ls.split_strategy(n)[0] for n in names))
            for name in names:
                env = ls.strategy_env(ls.split_strategy(name)[1])
                with env:
                    ffn = ls.make_layer(name, hidden, num_experts, top_k, width, shared)
                    layer = ls.ResidualBlock(ffn)
                    layer.build((batch, seq, hidden))
                    optimizer = keras.optimizers.Adam(1e-4)
                    optimizer.build(layer.trainable_variables)
                    step, _, _ = ls.make_torch_step(layer, optimizer, x, mode == "compile")
                    for _ in range(3):  # compiles
                        step()
                    label = name if mode == "eager" else f"{name} (torch.compile)"
                    candidates.append((label, env, step, []))
        for _ in range(args.repeats):
            for name, env, step, times in candidates:
                with env:
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    times.append((time.perf_counter() - start) / args.steps * 1e3)
        base = None
        for name, env, step, times in candidates:
            with env:
                operators = count_operators(step)
                before = None if "compile" in name else time_before_experts(step, args.steps)
            median = statistics.median(times)
            if name == "dense_ffn":  # the eager dense FFN
                base = (median, operators)
            rows.append(
                {
                    "config": config,
                    "shape": dict(zip(
                        ["batch", "seq", "hidden", "experts", "top_k", "width", "shared"],
                        ls.SMOKE_CONFIGS[config],
                    )),
                    "layer": name,
                    "host_ms": median,
                    "min_ms": min(times),
                    "before_experts_ms": before,
                    "operators": operators,
                    "vs_dense_ms": None if base is None else median / base[0],
                    "vs_dense_operators": None if base is None else operators / base[1],
                }
            )
    return rows


def markdown(rows, header):
    lines = [
        header,
        "",
        "| config | layer | host ms / step | min ms | vs dense | before experts ms "
        "| ATen operators / step | vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['layer']} | {r['host_ms']:.2f} | {r['min_ms']:.2f} | "
            f"{fmt(r['vs_dense_ms'])} | {fmt(r.get('before_experts_ms'))} | {r['operators']} | "
            f"{fmt(r['vs_dense_operators'])} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import keras
    import torch

    import layer_speed as ls

    rows = measure(args)
    header = (
        f"Host time of a PyTorch training step at tiny shapes (torch {torch.__version__}, "
        f"keras {keras.__version__}, keras-moe {ls.git_revision()}, 1 CPU thread, "
        f"median of {args.repeats} interleaved rounds of {args.steps} steps)."
    )
    text = markdown(rows, header)
    print(text)
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        stem = os.path.join(
            args.results_dir, "cpu_torch_host_overhead" + (f"_{args.tag}" if args.tag else "")
        )
        with open(stem + ".md", "w") as f:
            f.write(text + "\n")
        with open(stem + ".json", "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
