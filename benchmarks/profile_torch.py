"""Where a PyTorch training step of one layer spends its time (torch.profiler).

Builds the same residual block and step as `layer_speed.py`, runs a few
warm-up steps, profiles `--steps` steps and prints the operators by device
time (CUDA) or CPU time, plus the step's wall time against the summed
kernel time (a wall time far above the kernel time means the step waits on
the host: launches, syncs).

    KERAS_BACKEND=torch python benchmarks/profile_torch.py --config mixtral_half \
        --layer sparse_moe@grouped --dtype mixed_bfloat16
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KERAS_BACKEND", "torch")


def mark_first_projection():
    """Labels each call of the experts' first projection (`experts/first_projection`).

    The dropless experts' first projection is where the step issues its first
    expert matmul; before it, only the router's and the plan's small kernels.
    """
    import torch

    from keras_moe.dispatch import grouped

    original = grouped.gather_matmul

    def gather_matmul(*args, **kwargs):
        with torch.profiler.record_function("experts/first_projection"):
            return original(*args, **kwargs)

    grouped.gather_matmul = gather_matmul


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="e8k2")
    p.add_argument("--layer", default="sparse_moe", help="a layer_speed.py layer, e.g. sparse_moe@grouped")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--smoke", action="store_true")
    p.add_argument(
        "--trace",
        default=None,
        help="also write the profiled steps as a Chrome trace (.json.gz) with the step's phases "
        "labeled, for benchmarks/gpu_timeline.py",
    )
    args = p.parse_args()

    import keras
    import torch

    import layer_speed as ls

    keras.config.set_dtype_policy(args.dtype)
    configs = ls.SMOKE_CONFIGS if args.smoke else ls.CONFIGS
    batch, seq, hidden, num_experts, top_k, width, shared = configs[args.config]
    x = keras.ops.cast(
        keras.random.normal((batch, seq, hidden), seed=0), keras.config.dtype_policy().compute_dtype
    )
    env = ls.strategy_env(ls.split_strategy(args.layer)[1])
    with env:
        ffn = ls.make_layer(args.layer, hidden, num_experts, top_k, width, shared)
        layer = ls.ResidualBlock(ffn)
        layer.build((batch, seq, hidden))
        optimizer = keras.optimizers.Adam(1e-4)
        optimizer.build(layer.trainable_variables)
        step, _, _ = ls.make_torch_step(layer, optimizer, x, phases=args.trace is not None)
        if args.trace:
            mark_first_projection()
        for _ in range(3):
            ls.block(step())
        cuda = torch.cuda.is_available()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.steps):
                out = step()
            ls.block(out)
        wall = (time.perf_counter() - start) / args.steps
    if args.trace:
        os.makedirs(os.path.dirname(os.path.abspath(args.trace)), exist_ok=True)
        prof.export_chrome_trace(args.trace)
        print(f"trace: {args.trace}")
    events = prof.key_averages()
    sort = "device_time_total" if cuda else "cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    if cuda:
        kernel_us = sum(e.self_device_time_total for e in events) / args.steps
        print(f"{args.config} {args.layer}: wall {wall * 1e3:.2f} ms/step (profiled), "
              f"summed device time {kernel_us / 1e3:.2f} ms/step")


if __name__ == "__main__":
    main()
