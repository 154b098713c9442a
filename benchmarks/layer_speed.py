"""Training-step speed of SparseMoE vs a dense FFN vs keras-hub's Mixtral block.

Times one jit-compiled training step (forward, backward, Adam update) of each
layer, side by side in one process, with interleaved repeats (A B C A B C ...)
so that slow drifts of a shared machine hit every layer alike. Reports medians,
ratios and memory, prints a markdown table and saves JSON.

Layers (hidden `d`, `E` experts, top `k`, expert width `h`):

- `sparse_moe`: `keras_moe.layers.SparseMoE(E, h, top_k=k, gated=True,
  activation="silu")`, dropless; `sparse_moe_cf1.25` and `sparse_moe_cf1.0`
  the same with a capacity factor.
- `dense_ffn`: a dense SwiGLU FFN of width `k * h` (the same active parameters
  per token), `keras_moe.experts.FeedForward`.
- `keras_hub_mixtral`: keras-hub's `MixtralSparseMoeBlock`, which computes every
  expert on every token (`E / k` times the active FLOPs). Jitter stays 0.

Training step per backend:

- JAX: `jax.jit` of `layer.stateless_call` + `jax.value_and_grad` +
  `optimizer.stateless_apply`, the state donated; compiled ahead of time
  (`.lower().compile()`), whose `memory_analysis()` gives the memory columns.
- TensorFlow: `tf.function` with `GradientTape` + `optimizer.apply_gradients`,
  both with XLA (`jit_compile=True`) and without; tables use the faster.
- PyTorch: eager (Keras' torch backend), `loss.backward()` + `optimizer.apply`.

Loss: `mean(square(outputs))` plus the layer's auxiliary losses.

Usage (one process per backend; the backend is fixed when keras is imported):

    KERAS_BACKEND=jax python benchmarks/layer_speed.py [--smoke]
        [--configs main sweep | e8k2 e32k4 e8k2_t1024 ...] [--repeats N]
        [--dtype float32|mixed_bfloat16] [--out results.json]
"""

import argparse
import gc
import inspect
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (batch, seq, hidden, num_experts, top_k, expert_width)
CONFIGS = {
    "e8k2": (4, 1024, 512, 8, 2, 1024),
    "e32k4": (4, 1024, 512, 32, 4, 256),
    "e8k2_t1024": (1, 1024, 512, 8, 2, 1024),
    "e8k2_t2048": (2, 1024, 512, 8, 2, 1024),
    "e8k2_t8192": (8, 1024, 512, 8, 2, 1024),
}
SMOKE_CONFIGS = {
    "e8k2": (4, 16, 32, 4, 2, 32),
    "e32k4": (4, 16, 32, 8, 4, 16),
    "e8k2_t1024": (1, 16, 32, 4, 2, 32),
    "e8k2_t2048": (2, 16, 32, 4, 2, 32),
    "e8k2_t8192": (8, 16, 32, 4, 2, 32),
}
GROUPS = {
    "main": ["e8k2", "e32k4"],
    "sweep": ["e8k2_t1024", "e8k2_t2048", "e8k2", "e8k2_t8192"],
}
SWEEP = GROUPS["sweep"]  # config 1 at 1x, 2x, 4x, 8x the tokens
SMOKE_SWEEP = ["e8k2_t1024", "e8k2"]  # smoke: T and 4T only
LAYERS = ["dense_ffn", "sparse_moe", "sparse_moe_cf1.25", "sparse_moe_cf1.0", "keras_hub_mixtral"]
CAPACITY = {"sparse_moe": None, "sparse_moe_cf1.25": 1.25, "sparse_moe_cf1.0": 1.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat (CI check)")
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help=f"config names {sorted(CONFIGS)} or groups {sorted(GROUPS)} "
        "(default: main sweep; smoke: e8k2_t1024 e8k2, i.e. T and 4T)",
    )
    p.add_argument(
        "--layers",
        nargs="+",
        default=None,
        choices=LAYERS,
        help="default: all (smoke: all but sparse_moe_cf1.0, the same code as cf1.25)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; smoke 1)")
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="seconds per timed measurement; steps per measurement are chosen to fill it "
        "(default 0.25; smoke 0)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument(
        "--dtype",
        default="float32",
        help="Keras dtype policy, e.g. float32, mixed_bfloat16, bfloat16",
    )
    p.add_argument(
        "--tf-mode",
        default=None,
        choices=["both", "xla", "graph"],
        help="TensorFlow: tf.function with jit_compile=True (xla), False (graph), or both "
        "(default both; smoke graph)",
    )
    p.add_argument(
        "--memory",
        default="auto",
        choices=["auto", "off"],
        help="auto: JAX memory_analysis(); TF: allocator peak (tf.config.experimental); "
        "torch: allocator peak on GPU, peak RSS growth of one step in a separate process on CPU",
    )
    p.add_argument("--backend", default=None, help="sets KERAS_BACKEND (before importing keras)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.configs is None:
        # Smoke: one config at T and 4T covers every code path and the sweep table.
        args.configs = SMOKE_SWEEP if args.smoke else ["main", "sweep"]
    names = []
    for name in args.configs:
        for n in GROUPS.get(name, [name]):
            if n not in CONFIGS:
                p.error(f"unknown config {n!r}; choose from {sorted(CONFIGS)} or {sorted(GROUPS)}")
            if n not in names:
                names.append(n)
    args.configs = names
    if args.layers is None:
        args.layers = [n for n in LAYERS if not (args.smoke and n == "sparse_moe_cf1.0")]
    if args.tf_mode is None:
        args.tf_mode = "graph" if args.smoke else "both"
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 5
    if args.min_time is None:
        args.min_time = 0.0 if args.smoke else 0.25
    if args.smoke:
        args.warmup = min(args.warmup, 1)
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.backend:
    os.environ["KERAS_BACKEND"] = ARGS.backend
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow" and "tensorflow" not in sys.modules:
    # keras-hub imports TensorFlow when installed (for its data pipelines
    # only); blocking it keeps seconds of import time and a TF runtime out of
    # JAX and torch runs. keras-hub handles the ImportError.
    sys.modules["tensorflow"] = None

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

sys.path.insert(0, REPO_ROOT)
import keras_moe  # noqa: E402

BACKEND = keras.backend.backend()


# ----------------------------------------------------------------------------
# Device and synchronisation


def on_gpu():
    if BACKEND == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if BACKEND == "torch":
        import torch

        return torch.cuda.is_available()
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    return False


def device_description():
    cpu = f"{os.cpu_count()} CPU threads, {platform.processor() or platform.machine()}"
    desc = {"backend": BACKEND, "keras": keras.__version__, "cpu": cpu}
    if BACKEND == "jax":
        import jax

        desc["framework"] = f"jax {jax.__version__}"
        desc["device"] = str(jax.devices()[0].device_kind)
    elif BACKEND == "torch":
        import torch

        desc["framework"] = f"torch {torch.__version__}"
        if torch.cuda.is_available():
            desc["device"] = torch.cuda.get_device_name(0)
        else:
            desc["device"] = f"cpu ({torch.get_num_threads()} torch threads)"
    else:
        import tensorflow as tf

        desc["framework"] = f"tensorflow {tf.__version__}"
        gpus = tf.config.list_logical_devices("GPU")
        desc["device"] = gpus[0].name if gpus else "cpu"
    try:
        import keras_hub

        desc["keras_hub"] = keras_hub.__version__
    except Exception as e:  # noqa: BLE001
        desc["keras_hub"] = f"unavailable ({e.__class__.__name__})"
    desc["keras_moe"] = f"{keras_moe.__version__} {git_revision()}"
    desc["keras_moe_dropless_path"] = dropless_path_label()
    return desc


def git_revision():
    """The checkout's commit, `+dirty` if keras_moe/ has uncommitted changes."""
    try:
        run = lambda *cmd: subprocess.run(  # noqa: E731
            ["git", "-C", REPO_ROOT, *cmd], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        dirty = run("status", "--porcelain", "--", "keras_moe")
        return f"{commit}{'+dirty' if dirty else ''}" if commit else "(no git)"
    except Exception:  # noqa: BLE001
        return "(no git)"


def dropless_path_label():
    """How SparseMoE's dropless dispatch runs here (a label for the tables)."""
    grouped = keras_moe.backend.has_grouped_matmul()
    if grouped:
        # The fast path's name is private; it is read for the label only.
        module = sys.modules.get("keras_moe.backend.grouped_matmul")
        name = getattr(module, "_fast_path_name", lambda: None)() or "backend grouped matmul"
    default_strategy = getattr(keras_moe.dispatch, "default_strategy", None)
    if default_strategy is None:  # older keras_moe: grouped matmul where there is one
        strategy = "grouped" if grouped else "scan"
    else:
        strategy = default_strategy()
    label = {
        "grouped": f"rows sorted by expert through a grouped matmul ({name if grouped else '?'})",
        "scan": "per-expert blocks, a scan of dense matmuls",
        "batched": "per-expert blocks, one batched einsum over gathered kernels",
    }.get(strategy, strategy)
    if BACKEND == "tensorflow" and strategy == "grouped":
        label += "; under XLA the scan over blocks"
    return f"{strategy}: {label}"


def block(value):
    """Waits until `value` (a step's result) is computed."""
    if BACKEND == "jax":
        import jax

        jax.block_until_ready(value)
    elif BACKEND == "tensorflow":
        value.numpy()
    elif BACKEND == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


# ----------------------------------------------------------------------------
# Layers


def make_layer(name, hidden, num_experts, top_k, width):
    if name == "dense_ffn":
        return keras_moe.experts.FeedForward(
            intermediate_dim=top_k * width, gated=True, activation="silu", name=name
        )
    if name in CAPACITY:
        return keras_moe.layers.SparseMoE(
            num_experts=num_experts,
            intermediate_dim=width,
            top_k=top_k,
            gated=True,
            activation="silu",
            capacity_factor=CAPACITY[name],
            name=name.replace(".", "_"),
        )
    if name == "keras_hub_mixtral":
        # Not exported by keras-hub; the block inside MixtralTransformerDecoder.
        from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock

        return MixtralSparseMoeBlock(
            hidden_dim=hidden,
            intermediate_dim=width,
            num_experts=num_experts,
            top_k=top_k,
            router_jitter_noise=0.0,  # its jitter path calls ops.random.uniform: raises
            name=name,
        )
    raise ValueError(name)


def call_kwargs(layer):
    """`training=True` where the layer's `call` takes it (FeedForward does not)."""
    return {"training": True} if "training" in inspect.signature(layer.call).parameters else {}


def first_output(outputs):
    # MixtralSparseMoeBlock returns (outputs, router_logits).
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def variable_bytes(variables):
    return int(
        sum(
            math.prod(v.shape) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
            for v in variables
        )
    )


# ----------------------------------------------------------------------------
# Training steps. Each `make_*_step` returns (step, info); `step()` runs one
# training step and returns something `block` can wait on.


def make_jax_step(layer, optimizer, x, memory):
    import jax
    import jax.numpy as jnp

    kwargs = call_kwargs(layer)

    def loss_fn(trainable, non_trainable, x):
        outputs, non_trainable, losses = layer.stateless_call(
            trainable, non_trainable, x, return_losses=True, **kwargs
        )
        y = first_output(outputs)
        loss = jnp.mean(jnp.square(y.astype("float32")))
        for aux in losses:
            loss = loss + aux.astype("float32")
        return loss, non_trainable

    def train_step(state, x):
        trainable, non_trainable, opt_vars = state
        (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable, x
        )
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return loss, (trainable, non_trainable, opt_vars)

    state = (
        [v.value for v in layer.trainable_variables],
        [v.value for v in layer.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )
    start = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, x).compile()
    info = {"compile_s": time.perf_counter() - start}
    if memory:
        stats = compiled.memory_analysis()
        if stats is not None:
            info["memory"] = {
                "method": "jax compiled memory_analysis()",
                "temp_bytes": int(stats.temp_size_in_bytes),
                "argument_bytes": int(stats.argument_size_in_bytes),
                "output_bytes": int(stats.output_size_in_bytes),
                "alias_bytes": int(stats.alias_size_in_bytes),
            }
    holder = {"state": state}

    def step():
        loss, holder["state"] = compiled(holder["state"], x)
        return holder["state"]

    def finish():
        # Write the final state back (routing statistics such as dropped_count).
        trainable, non_trainable, _ = holder["state"]
        for v, value in zip(layer.trainable_variables, trainable):
            v.assign(value)
        for v, value in zip(layer.non_trainable_variables, non_trainable):
            v.assign(value)

    return step, finish, info


def make_tf_step(layer, optimizer, x, jit_compile):
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one tf.function per layer: retracing warnings are noise
    kwargs = call_kwargs(layer)

    @tf.function(jit_compile=jit_compile)
    def train_step(x):
        with tf.GradientTape() as tape:
            y = first_output(layer(x, **kwargs))
            loss = ops.mean(ops.square(ops.cast(y, "float32")))
            for aux in layer.losses:
                loss = loss + ops.cast(aux, "float32")
        variables = layer.trainable_variables
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    def step():
        return train_step(x)

    return step, None, {}


def make_torch_step(layer, optimizer, x):
    import torch

    variables = layer.trainable_variables
    kwargs = call_kwargs(layer)

    def step():
        y = first_output(layer(x, **kwargs))
        loss = ops.mean(ops.square(ops.cast(y, "float32")))
        for aux in layer.losses:
            loss = loss + ops.cast(aux, "float32")
        for v in variables:
            v.value.grad = None
        loss.backward()
        grads = [v.value.grad for v in variables]
        with torch.no_grad():
            optimizer.apply(grads, variables)
        return loss

    return step, None, {}


def variants_for(args):
    """Step variants per layer: TF has XLA and non-XLA graphs."""
    if BACKEND != "tensorflow":
        return [None]
    return {"both": ["xla", "graph"], "xla": ["xla"], "graph": ["graph"]}[args.tf_mode]


class Candidate:
    """One layer (and TF mode) with its optimizer, step and measurements."""

    def __init__(self, layer_name, mode, layer, optimizer, x, memory):
        self.layer_name = layer_name
        self.mode = mode
        self.layer = layer
        self.times = []
        self.error = None
        self.finish = None
        self.info = {}
        if BACKEND == "jax":
            self.step, self.finish, self.info = make_jax_step(layer, optimizer, x, memory)
        elif BACKEND == "tensorflow":
            self.step, _, self.info = make_tf_step(layer, optimizer, x, mode == "xla")
        else:
            self.step, _, self.info = make_torch_step(layer, optimizer, x)

    @property
    def key(self):
        return self.layer_name if self.mode is None else f"{self.layer_name}[{self.mode}]"

    def run(self, n):
        start = time.perf_counter()
        for _ in range(n):
            out = self.step()
        block(out)
        return (time.perf_counter() - start) / n


def build_candidates(config, args, layers, memory):
    batch, seq, hidden, num_experts, top_k, width = config
    keras.utils.set_random_seed(args.seed)
    x = keras.random.normal((batch, seq, hidden), seed=args.seed)
    x = ops.cast(x, keras.config.dtype_policy().compute_dtype)
    candidates = []
    for name in layers:
        for mode in variants_for(args):
            layer = make_layer(name, hidden, num_experts, top_k, width)
            layer.build((batch, seq, hidden))
            optimizer = keras.optimizers.Adam(learning_rate=1e-4)
            optimizer.build(layer.trainable_variables)
            try:
                candidates.append(Candidate(name, mode, layer, optimizer, x, memory))
            except Exception as e:  # noqa: BLE001
                c = Candidate.__new__(Candidate)
                c.layer_name, c.mode, c.layer, c.times, c.info = name, mode, layer, [], {}
                c.error = f"{e.__class__.__name__}: {str(e).splitlines()[0][:200]}"
                candidates.append(c)
            c = candidates[-1]
            c.info["param_bytes"] = variable_bytes(layer.weights)
            c.info["optimizer_bytes"] = variable_bytes(optimizer.variables)
    return x, candidates


def warm_up(c, args):
    """Compiles (first call) and runs the warm-up steps; returns a step time."""
    try:
        start = time.perf_counter()
        block(c.step())
        c.info["first_step_s"] = time.perf_counter() - start
        for _ in range(args.warmup):
            block(c.step())
        return c.run(1)
    except Exception as e:  # noqa: BLE001
        c.error = f"{e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return None


def torch_gpu_memory(c):
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    block(c.step())
    c.info["memory"] = {
        "method": "torch.cuda.max_memory_allocated() during one step, minus allocated before",
        "temp_bytes": int(torch.cuda.max_memory_allocated() - base),
    }


def tf_memory(c):
    import tensorflow as tf

    device = "GPU:0" if on_gpu() else "CPU:0"
    base = tf.config.experimental.get_memory_info(device)["current"]
    tf.config.experimental.reset_memory_stats(device)
    block(c.step())
    peak = tf.config.experimental.get_memory_info(device)["peak"]
    c.info["memory"] = {
        "method": f"tf.config.experimental.get_memory_info('{device}') peak during one step, "
        "minus current before",
        "temp_bytes": int(peak - base),
    }


def bench_config(name, args, layers):
    config = (SMOKE_CONFIGS if args.smoke else CONFIGS)[name]
    batch, seq, hidden, num_experts, top_k, width = config
    memory = args.memory != "off"
    x, candidates = build_candidates(config, args, layers, memory)
    inner = {}
    for c in candidates:
        if c.error:
            continue
        t = warm_up(c, args)
        if t is None:
            continue
        inner[c.key] = max(1, math.ceil(args.min_time / max(t, 1e-6))) if args.min_time else 1
        if memory and BACKEND == "torch" and on_gpu():
            torch_gpu_memory(c)
        elif memory and BACKEND == "tensorflow":
            tf_memory(c)
    live = [c for c in candidates if not c.error]
    for _ in range(args.repeats):  # interleaved: A B C A B C ...
        for c in live:
            c.times.append(c.run(inner[c.key]))
    tokens = batch * seq
    active_flops = 3 * 2 * tokens * hidden * 3 * top_k * width  # fwd + 2x bwd, 3 matmuls
    rows = []
    for c in candidates:
        row = {
            "config": name,
            "layer": c.layer_name,
            "mode": c.mode,
            "tokens": tokens,
            "shape": {
                "batch": batch,
                "seq": seq,
                "hidden": hidden,
                "num_experts": num_experts,
                "top_k": top_k,
                "expert_width": width,
                "dense_width": top_k * width,
            },
            "error": c.error,
            "times_ms": [t * 1e3 for t in c.times],
            "steps_per_measurement": inner.get(c.key),
            **c.info,
        }
        if c.times:
            row["median_ms"] = statistics.median(c.times) * 1e3
            row["min_ms"] = min(c.times) * 1e3
            row["active_tflops"] = active_flops / statistics.median(c.times) / 1e12
        if c.layer_name in CAPACITY and not c.error:
            if c.finish is not None:
                c.finish()
            dropped = float(ops.convert_to_numpy(c.layer.dropped_count))
            row["dropped_fraction"] = dropped / (tokens * top_k)
        rows.append(row)
    del x, candidates, live
    gc.collect()
    return rows


# ----------------------------------------------------------------------------
# Memory of torch on CPU (no allocator statistics): peak RSS growth of one step, in a child process
# whose glibc returns every large free to the OS (so RSS follows live memory).


def _status_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def memory_child(args):
    results = []
    for name in args.configs:
        config = (SMOKE_CONFIGS if args.smoke else CONFIGS)[name]
        x, candidates = build_candidates(config, args, args.layers, memory=False)
        for c in candidates:
            entry = {"config": name, "layer": c.layer_name, "mode": c.mode}
            if not c.error and warm_up(c, args) is not None:
                gc.collect()
                before = _status_kib("VmRSS")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM, the peak RSS
                block(c.step())
                entry["temp_bytes"] = (_status_kib("VmHWM") - before) * 1024
            results.append(entry)
        del x, candidates
        gc.collect()
    print("MEMORY_JSON " + json.dumps(results))


def rss_memory(args, rows):
    if not sys.platform.startswith("linux"):
        return
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", "--warmup", "1"]
    configs = args.configs[:1] if args.smoke else args.configs  # smoke: check the path only
    cmd += ["--configs", *configs, "--layers", *args.layers, "--dtype", args.dtype]
    cmd += ["--tf-mode", args.tf_mode, "--seed", str(args.seed)]
    if args.smoke:
        cmd.append("--smoke")
    env = dict(os.environ, KERAS_BACKEND=BACKEND, MALLOC_MMAP_THRESHOLD_="65536")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY_JSON ")][-1]
    except Exception as e:  # noqa: BLE001
        print(f"memory child failed: {e}", file=sys.stderr)
        return
    method = (
        "peak RSS growth during one step (VmHWM reset via /proc/self/clear_refs), "
        "separate process with MALLOC_MMAP_THRESHOLD_=65536"
    )
    found = {(m["config"], m["layer"], m["mode"]): m for m in json.loads(line[len("MEMORY_JSON ") :])}
    for row in rows:
        m = found.get((row["config"], row["layer"], row["mode"]))
        if m and "temp_bytes" in m:
            row["memory"] = {"method": method, "temp_bytes": m["temp_bytes"]}


# ----------------------------------------------------------------------------
# Reporting


def best_rows(rows):
    """One row per (config, layer): the fastest mode (TF: XLA or not)."""
    best = {}
    for row in rows:
        key = (row["config"], row["layer"])
        cur = best.get(key)
        if cur is None or (
            "median_ms" in row and ("median_ms" not in cur or row["median_ms"] < cur["median_ms"])
        ):
            best[key] = row
    return best


def mib(n):
    return f"{n / 2**20:.1f}" if n is not None else "—"


def markdown(results):
    dev = results["device"]
    rows = results["rows"]
    best = best_rows(rows)
    out = [
        f"### {dev['backend']} — {dev['device']} ({dev['framework']}, keras {dev['keras']}, "
        f"keras-hub {dev['keras_hub']}, keras-moe {dev.get('keras_moe', '?')}, "
        f"dtype policy {results['dtype']})",
        "",
        f"keras_moe dropless path: {dev['keras_moe_dropless_path']}. "
        f"Median of {results['repeats']} interleaved repeats; ratios are median / median.",
        "",
    ]
    mode_col = dev["backend"] == "tensorflow"
    head = "| config | T | layer |" + (" tf mode |" if mode_col else "")
    head += " median ms | min ms | active TFLOP/s | vs dense | vs keras-hub | step temp MiB | params+opt MiB | dropped |"
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    for cfg in configs:
        dense = best.get((cfg, "dense_ffn"), {}).get("median_ms")
        hub = best.get((cfg, "keras_hub_mixtral"), {}).get("median_ms")
        for layer in LAYERS:
            row = best.get((cfg, layer))
            if row is None:
                continue
            s = row["shape"]
            label = f"{cfg} (E={s['num_experts']}, k={s['top_k']}, h={s['expert_width']})"
            cells = [label, str(row["tokens"]), layer]
            if mode_col:
                others = [
                    r for r in rows if r["config"] == cfg and r["layer"] == layer and r is not row
                ]
                note = row["mode"] or ""
                for o in others:
                    note += (
                        f" ({o['mode']}: {o['median_ms']:.1f})"
                        if "median_ms" in o
                        else f" ({o['mode']} failed)"
                    )
                cells.append(note)
            if "median_ms" not in row:
                cells += [f"failed: {row['error']}"] + ["—"] * 8
                out.append("| " + " | ".join(cells) + " |")
                continue
            med = row["median_ms"]
            mem = row.get("memory", {})
            temp = mem.get("temp_bytes")
            state = row["param_bytes"] + row["optimizer_bytes"]
            dropped = row.get("dropped_fraction")
            cells += [
                f"{med:.2f}",
                f"{row['min_ms']:.2f}",
                f"{row['active_tflops']:.3f}",
                f"{med / dense:.2f}" if dense else "—",
                f"{med / hub:.2f}" if hub else "—",
                mib(temp),
                mib(state),
                f"{dropped:.1%}" if dropped is not None else "",
            ]
            out.append("| " + " | ".join(cells) + " |")
    sweep = [c for c in (SMOKE_SWEEP if results["smoke"] else SWEEP) if c in configs]
    if len(sweep) >= 2:
        tokens = {c: next(r["tokens"] for r in rows if r["config"] == c) for c in sweep}
        head = "| layer | " + " | ".join(f"T={tokens[c]} ms" for c in sweep) + " |"
        quads = [
            (a, b) for a in sweep for b in sweep if tokens[b] == 4 * tokens[a]
        ]
        head += "".join(f" t({tokens[b]})/t({tokens[a]}) |" for a, b in quads)
        out += ["", "Token sweep (config e8k2); a linear layer gives 4.0 for 4x the tokens:", ""]
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        for layer in LAYERS:
            meds = [best.get((c, layer), {}).get("median_ms") for c in sweep]
            if all(m is None for m in meds):
                continue
            cells = [layer] + [f"{m:.2f}" if m else "—" for m in meds]
            for a, b in quads:
                ta = best.get((a, layer), {}).get("median_ms")
                tb = best.get((b, layer), {}).get("median_ms")
                cells.append(f"{tb / ta:.2f}" if ta and tb else "—")
            out.append("| " + " | ".join(cells) + " |")
    methods = sorted({r["memory"]["method"] for r in rows if "memory" in r})
    out += ["", "Memory: " + ("; ".join(methods) if methods else "not measured") + "."]
    if dev["backend"] == "jax":
        out.append(
            "JAX 'step temp' is XLA's temp_size_in_bytes (scratch beyond arguments/outputs, "
            "which hold params, optimizer state and input)."
        )
    return "\n".join(out)


def main(args):
    keras.config.set_dtype_policy(args.dtype)
    if args.memory_child:
        memory_child(args)
        return
    results = {
        "device": device_description(),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "min_time_s": args.min_time,
        "warmup": args.warmup,
        "smoke": args.smoke,
        "argv": sys.argv[1:],
        "rows": [],
    }
    print(f"# {results['device']}", flush=True)
    for name in args.configs:
        start = time.perf_counter()
        rows = bench_config(name, args, args.layers)
        results["rows"] += rows
        summary = ", ".join(
            f"{r['layer']}{'[' + r['mode'] + ']' if r['mode'] else ''}="
            + (
                f"{r['median_ms']:.1f}ms (first step {r['first_step_s'] + r.get('compile_s', 0):.1f}s)"
                if "median_ms" in r
                else "failed"
            )
            for r in rows
        )
        print(f"{name}: {summary} ({time.perf_counter() - start:.0f}s)", flush=True)
    if args.memory == "auto" and not on_gpu() and BACKEND == "torch":
        rss_memory(args, results["rows"])
    table = markdown(results)
    print()
    print(table)
    results["markdown"] = table
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    for r in results["rows"]:
        if r["error"]:
            print(f"failed: {r['config']} {r['layer']} {r['mode']}: {r['error']}", file=sys.stderr)
    # A layer fails the run only if no mode of it ran (TF: XLA or not).
    if any("median_ms" not in r for r in best_rows(results["rows"]).values()):
        sys.exit(1)


if __name__ == "__main__":
    main(ARGS)
