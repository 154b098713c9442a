"""Training-step speed and memory of SparseMoE vs a dense FFN vs keras-hub's Mixtral block.

Each layer is measured the way a model runs it: as the feed-forward half of a
pre-norm transformer block, `y = x + FFN(LayerNorm(x))`, in one compiled
training step (forward, backward *including the gradient with respect to the
block's input `x`*, Adam update). Inside a model every FFN back-propagates
into its input; for an MoE that backward pass (the transpose of the token
gathers) is a large part of the cost, so leaving it out flatters the MoE.

The layers run side by side in one process, with interleaved repeats (A B C A
B C ...) so that slow drifts of a shared machine hit every layer alike. The
script reports medians, ratios, step memory and the machine's load average,
prints a markdown table and writes it (markdown + JSON) to `--results-dir`.

Layers (hidden `d`, `E` experts, top `k`, expert width `h`, shared width `s`):

- `sparse_moe`: `keras_moe.layers.SparseMoE(E, h, top_k=k, gated=True,
  activation="silu", shared_intermediate_dim=s)`, dropless;
  `sparse_moe_cf1.25` and `sparse_moe_cf1.0` the same with a capacity factor.
- `dense_ffn`: a dense SwiGLU FFN of width `k * h + s` (the same active
  parameters per token), `keras_moe.experts.FeedForward`.
- `keras_hub_mixtral`: keras-hub's `MixtralSparseMoeBlock`, which computes every
  expert on every token (`E / k` times the active FLOPs; no shared expert).

Training step per backend:

- JAX: `jax.jit` of `stateless_call` + `jax.value_and_grad` (variables and
  input) + `optimizer.stateless_apply`, the state donated; compiled ahead of
  time, whose `memory_analysis()` gives the memory column.
- TensorFlow: `tf.function` with `GradientTape` (variables and input) +
  `optimizer.apply_gradients`, with XLA (`jit_compile=True`) and without.
- PyTorch: Keras' eager torch backend, `loss.backward()` + `optimizer.apply`;
  `--torch-mode compile` also runs the forward and loss through
  `torch.compile` (what Keras' `jit_compile=True` does on torch).

Loss: `mean(square(y))` plus the layer's auxiliary losses.

Usage (one process per backend; the backend is fixed when keras is imported):

    KERAS_BACKEND=jax python benchmarks/layer_speed.py [--smoke]
        [--configs main sweep gpu | e8k2 e32k4 e64k8 ...] [--repeats N]
        [--dtype float32|mixed_bfloat16] [--results-dir DIR] [--tag TAG]
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
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")

# name: (batch, seq, hidden, num_experts, top_k, expert_width, shared_width)
CONFIGS = {
    "e8k2": (4, 1024, 512, 8, 2, 1024, 0),
    "e32k4": (4, 1024, 512, 32, 4, 256, 0),
    # Fine-grained (DeepSeekMoE / Qwen3-MoE style) at CPU size: dense width 1024.
    "e64k8": (4, 1024, 512, 64, 8, 128, 0),
    "e8k2_t1024": (1, 1024, 512, 8, 2, 1024, 0),
    "e8k2_t2048": (2, 1024, 512, 8, 2, 1024, 0),
    "e8k2_t8192": (8, 1024, 512, 8, 2, 1024, 0),
    # Real sizes, for accelerators (T = 16384, hidden 2048; run with --dtype mixed_bfloat16).
    # Mixtral-8x7B at half width: E=8, k=2, h=7168.
    "mixtral_half": (4, 4096, 2048, 8, 2, 7168, 0),
    # DeepSeek-V2-Lite: 64 experts of width 1408, top-6, 2 shared experts (one FFN of 2 * 1408).
    "dsv2_lite": (4, 4096, 2048, 64, 6, 1408, 2816),
}
SMOKE_CONFIGS = {
    "e8k2": (4, 16, 32, 4, 2, 32, 0),
    "e32k4": (4, 16, 32, 8, 4, 16, 0),
    "e64k8": (4, 16, 32, 16, 8, 8, 0),
    "e8k2_t1024": (1, 16, 32, 4, 2, 32, 0),
    "e8k2_t2048": (2, 16, 32, 4, 2, 32, 0),
    "e8k2_t8192": (8, 16, 32, 4, 2, 32, 0),
    "mixtral_half": (2, 16, 32, 4, 2, 32, 0),
    "dsv2_lite": (2, 16, 32, 8, 3, 8, 16),
}
GROUPS = {
    "main": ["e8k2", "e32k4", "e64k8"],
    "sweep": ["e8k2_t1024", "e8k2_t2048", "e8k2", "e8k2_t8192"],
    "gpu": ["mixtral_half", "dsv2_lite"],
}
SWEEP = GROUPS["sweep"]  # config e8k2 at 1x, 2x, 4x, 8x the tokens
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
        "(default: main; smoke: e8k2_t1024 e8k2, i.e. T and 4T)",
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
        "--torch-mode",
        default="eager",
        choices=["eager", "compile", "both"],
        help="PyTorch: Keras' eager backend, the forward and loss through torch.compile, "
        "or both (default eager)",
    )
    p.add_argument(
        "--memory",
        default="auto",
        choices=["auto", "off"],
        help="auto: JAX memory_analysis(); TF: allocator peak (tf.config.experimental); "
        "torch: allocator peak on GPU, peak RSS growth of one step in a separate process on CPU, "
        "and the bytes autograd saves for the backward",
    )
    p.add_argument("--backend", default=None, help="sets KERAS_BACKEND (before importing keras)")
    p.add_argument(
        "--strategy",
        default=None,
        help="dropless strategy (sets KERAS_MOE_DROPLESS_STRATEGY; default: "
        "keras_moe.dispatch.default_strategy() for the device)",
    )
    p.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        help="also measure the dropless sparse_moe with each of these strategies "
        "(rows `sparse_moe@<strategy>`, same process, interleaved), to compare them; "
        "`grouped:pallas` / `grouped:xla` also pick JAX's grouped-matmul kernel",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="PyTorch / TensorFlow intra-op threads (default: the framework's)",
    )
    p.add_argument(
        "--results-dir",
        default=None,
        help=f"write <device>_<backend>[_<dtype>][_<tag>].md/.json here (default {RESULTS_DIR}; "
        "smoke: nowhere)",
    )
    p.add_argument("--tag", default=None, help="suffix of the result file names")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.configs is None:
        # Smoke: one config at T and 4T covers every code path and the sweep table.
        args.configs = SMOKE_SWEEP if args.smoke else ["main"]
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
    for strategy in args.strategies or []:
        args.layers.append(f"sparse_moe@{strategy}")
    if args.tf_mode is None:
        args.tf_mode = "graph" if args.smoke else "both"
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 5
    if args.min_time is None:
        args.min_time = 0.0 if args.smoke else 0.25
    if args.smoke:
        args.warmup = min(args.warmup, 1)
    if args.results_dir is None and not args.smoke:
        args.results_dir = RESULTS_DIR
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.backend:
    os.environ["KERAS_BACKEND"] = ARGS.backend
if ARGS is not None and ARGS.strategy:
    os.environ["KERAS_MOE_DROPLESS_STRATEGY"] = ARGS.strategy
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
XLA_DUMP = None
if (
    ARGS is not None
    and os.environ.get("KERAS_BACKEND") == "tensorflow"
    and ARGS.memory == "auto"
    and "--xla_dump_to" not in os.environ.get("XLA_FLAGS", "")
):
    # TensorFlow has no API for the memory of an XLA-compiled function; its
    # buffer assignment (dumped at compile time) gives the same figure as
    # JAX's memory_analysis(). Set before TensorFlow starts.
    import tempfile

    XLA_DUMP = tempfile.mkdtemp(prefix="layer_speed_xla_")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={XLA_DUMP} --xla_dump_hlo_pass_re=^$"
    ).strip()
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
# Device, load and synchronisation


def on_gpu():
    return keras_moe.backend.on_accelerator()


def load_average():
    """The 1-minute load average (what `uptime` shows first), or None."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def device_description():
    cpu = f"{os.cpu_count()} CPU threads, {platform.processor() or platform.machine()}"
    desc = {"backend": BACKEND, "keras": keras.__version__, "cpu": cpu}
    desc["python"] = platform.python_version()
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


def device_slug(desc):
    """`cpu`, or e.g. `gpu_nvidia_h100_80gb_hbm3`, for result file names."""
    if not on_gpu():
        return "cpu"
    name = desc["device"].lower()
    return "gpu_" + re.sub(r"[^a-z0-9]+", "_", name).strip("_")


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
    strategy = keras_moe.dispatch.default_strategy()
    describe = getattr(keras_moe.dispatch, "describe_strategy", None)
    return f"{strategy}: {describe(strategy)}" if describe else strategy


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


class ResidualBlock(keras.layers.Layer):
    """`x + ffn(LayerNorm(x))`: the feed-forward half of a pre-norm block."""

    def __init__(self, ffn, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.LayerNormalization(epsilon=1e-5, name="norm")
        self.ffn = ffn
        self.ffn_kwargs = call_kwargs(ffn)

    def build(self, input_shape):
        self.norm.build(input_shape)
        self.ffn.build(input_shape)

    def call(self, x):
        return x + first_output(self.ffn(self.norm(x), **self.ffn_kwargs))


def split_strategy(name):
    """`"sparse_moe@grouped"` -> `("sparse_moe", "grouped")`; no `@` -> `(name, None)`."""
    base, _, strategy = name.partition("@")
    return base, strategy or None


class strategy_env:
    """Sets `KERAS_MOE_DROPLESS_STRATEGY` while tracing / running one candidate's step."""

    def __init__(self, strategy):
        self.strategy = strategy

    NAMES = ("KERAS_MOE_DROPLESS_STRATEGY", "KERAS_MOE_GROUPED_MATMUL")

    def __enter__(self):
        # "grouped:pallas": the strategy, then the JAX grouped-matmul kernel.
        values = (self.strategy or "").split(":")
        self.saved = {n: os.environ.get(n) for n in self.NAMES}
        for name, value in zip(self.NAMES, values):
            if value:
                os.environ[name] = value

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_layer(name, hidden, num_experts, top_k, width, shared):
    name, strategy = split_strategy(name)
    if name == "dense_ffn":
        return keras_moe.experts.FeedForward(
            intermediate_dim=top_k * width + shared, gated=True, activation="silu", name=name
        )
    if name in CAPACITY:
        return keras_moe.layers.SparseMoE(
            num_experts=num_experts,
            intermediate_dim=width,
            top_k=top_k,
            gated=True,
            activation="silu",
            shared_intermediate_dim=shared,
            capacity_factor=CAPACITY[name],
            name=re.sub(r"[^A-Za-z0-9_]", "_", name + (f"_{strategy}" if strategy else "")),
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
# Training steps. Each `make_*_step` returns (step, finish, info); `step()`
# runs one training step and returns something `block` can wait on; the input
# gradient is always computed and returned (as a model would pass it on).


def make_jax_step(layer, optimizer, x, memory):
    import jax
    import jax.numpy as jnp

    def loss_fn(trainable, x, non_trainable):
        y, non_trainable, losses = layer.stateless_call(
            trainable, non_trainable, x, return_losses=True
        )
        loss = jnp.mean(jnp.square(y.astype("float32")))
        for aux in losses:
            loss = loss + aux.astype("float32")
        return loss, non_trainable

    def train_step(state, x):
        trainable, non_trainable, opt_vars = state
        (loss, non_trainable), (grads, grad_x) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(trainable, x, non_trainable)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return (loss, grad_x), (trainable, non_trainable, opt_vars)

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
        outputs, holder["state"] = compiled(holder["state"], x)
        return outputs

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

    @tf.function(jit_compile=jit_compile)
    def train_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = ops.mean(ops.square(ops.cast(y, "float32")))
            for aux in layer.losses:
                loss = loss + ops.cast(aux, "float32")
        variables = layer.trainable_variables
        grads = tape.gradient(loss, variables + [x])
        optimizer.apply_gradients(zip(grads[:-1], variables))
        return grads[-1]

    def step():
        return train_step(x)

    return step, None, {}


def make_torch_step(layer, optimizer, x, compiled=False, phases=False):
    """The torch training step; `phases=True` labels its parts for the profiler.

    With `phases` (eager only) the forward pass, backward pass and optimizer
    update run inside `torch.profiler.record_function` ranges named
    `step/forward`, `step/backward` and `step/optimizer`
    (`benchmarks/gpu_timeline.py` reads them from a trace).
    """
    import contextlib

    import torch

    variables = layer.trainable_variables
    x = x.detach().requires_grad_(True)
    label = torch.profiler.record_function if phases else (lambda name: contextlib.nullcontext())

    def forward_loss(x):
        y = layer(x)
        loss = ops.mean(ops.square(ops.cast(y, "float32")))
        for aux in layer.losses:
            loss = loss + ops.cast(aux, "float32")
        return loss

    def step():
        for v in variables:
            v.value.grad = None
        x.grad = None
        with label("step/forward"):
            loss = forward_loss(x)
        with label("step/backward"):
            loss.backward()
        grads = [v.value.grad for v in variables]
        with label("step/optimizer"), torch.no_grad():
            optimizer.apply(grads, variables)
        return x.grad

    if compiled:
        # What Keras' `jit_compile=True` does on torch (`TorchTrainer`
        # compiles its whole train step): dynamo splits the step at
        # `.backward()` into the forward and loss (AOTAutograd compiles their
        # backward) and the optimizer update.
        step = torch.compile(step)

    step.input = x
    return step, None, {}


def variants_for(args):
    """Step variants per layer: TF has XLA and non-XLA graphs, torch eager and compiled."""
    if BACKEND == "tensorflow":
        return {"both": ["xla", "graph"], "xla": ["xla"], "graph": ["graph"]}[args.tf_mode]
    if BACKEND == "torch":
        return {"both": ["eager", "compile"], "eager": ["eager"], "compile": ["compile"]}[
            args.torch_mode
        ]
    return [None]


class Candidate:
    """One layer (and TF / torch mode) with its optimizer, step and measurements."""

    def __init__(self, layer_name, mode, layer, optimizer, x, memory):
        self.layer_name = layer_name
        self.mode = mode
        self.layer = layer
        self.times = []
        self.loads = []
        self.error = None
        self.finish = None
        self.info = {}
        env = strategy_env(split_strategy(layer_name)[1])
        with env:
            if BACKEND == "jax":
                step, self.finish, self.info = make_jax_step(layer, optimizer, x, memory)
            elif BACKEND == "tensorflow":
                step, _, self.info = make_tf_step(layer, optimizer, x, mode == "xla")
            else:
                step, _, self.info = make_torch_step(layer, optimizer, x, mode == "compile")
        if env.strategy is None:
            self.step = step
        else:

            def strategy_step():
                with env:
                    return step()

            strategy_step.__dict__.update(step.__dict__)  # torch: `step.input`
            self.step = strategy_step

    @classmethod
    def failed(cls, layer_name, mode, layer, error):
        c = cls.__new__(cls)
        c.layer_name, c.mode, c.layer = layer_name, mode, layer
        c.times, c.loads, c.info, c.finish = [], [], {}, None
        c.error = f"{error.__class__.__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        return c

    @property
    def key(self):
        return self.layer_name if self.mode is None else f"{self.layer_name}[{self.mode}]"

    def run(self, n):
        self.loads.append(load_average())
        start = time.perf_counter()
        for _ in range(n):
            out = self.step()
        block(out)
        return (time.perf_counter() - start) / n


def build_candidates(config, args, layers, memory):
    batch, seq, hidden, num_experts, top_k, width, shared = config
    keras.utils.set_random_seed(args.seed)
    x = keras.random.normal((batch, seq, hidden), seed=args.seed)
    x = ops.cast(x, keras.config.dtype_policy().compute_dtype)
    candidates = []
    for name in layers:
        for mode in variants_for(args):
            ffn = make_layer(name, hidden, num_experts, top_k, width, shared)
            layer = ResidualBlock(ffn, name=f"block_{ffn.name}")
            layer.build((batch, seq, hidden))
            optimizer = keras.optimizers.Adam(learning_rate=1e-4)
            optimizer.build(layer.trainable_variables)
            try:
                candidates.append(Candidate(name, mode, layer, optimizer, x, memory))
            except Exception as e:  # noqa: BLE001
                candidates.append(Candidate.failed(name, mode, layer, e))
            c = candidates[-1]
            c.info["param_bytes"] = variable_bytes(ffn.weights)
            # Adam: two slots per trainable variable.
            c.info["optimizer_bytes"] = 2 * variable_bytes(ffn.trainable_weights)
    return x, candidates


def warm_up(c, args):
    """Compiles (first call) and runs the warm-up steps; returns a step time."""
    try:
        start = time.perf_counter()
        block(c.step())
        c.info["first_step_s"] = time.perf_counter() - start
        # torch.compile recompiles once or twice (Keras' call context) before it settles.
        for _ in range(max(args.warmup, 3) if c.mode == "compile" else args.warmup):
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


def torch_saved_bytes(c):
    """Bytes autograd keeps for the backward pass of one step, beyond variables and input.

    Deterministic (no allocator involved): every tensor saved for the backward
    goes through `saved_tensors_hooks`; storages are counted once.
    """
    import torch

    own = {v.value.untyped_storage().data_ptr() for v in c.layer.weights}
    own.add(c.step.input.untyped_storage().data_ptr())  # the caller's tensor, not step memory
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(c.step())
    c.info["saved_for_backward_bytes"] = int(sum(storages.values()))


def xla_dump_temp_bytes(since):
    """XLA's temp buffer of the newest compiled train step dumped after `since`, or None."""
    if XLA_DUMP is None:
        return None
    files = [
        os.path.join(XLA_DUMP, f)
        for f in os.listdir(XLA_DUMP)
        if "train_step" in f and f.endswith("buffer-assignment.txt")
    ]
    files = [f for f in files if os.path.getmtime(f) >= since]
    if not files:
        return None
    with open(max(files, key=os.path.getmtime)) as f:
        found = re.search(r"^allocation \d+: size (\d+), preallocated-temp", f.read(), re.M)
    for f in os.listdir(XLA_DUMP):  # the dumps are large; keep none
        os.remove(os.path.join(XLA_DUMP, f))
    return int(found.group(1)) if found else None


def tf_memory(c, compiled_since):
    import tensorflow as tf

    device = "GPU:0" if on_gpu() else "CPU:0"
    base = tf.config.experimental.get_memory_info(device)["current"]
    tf.config.experimental.reset_memory_stats(device)
    block(c.step())
    peak = tf.config.experimental.get_memory_info(device)["peak"]
    c.info["allocator_peak_bytes"] = int(peak - base)
    temp = xla_dump_temp_bytes(compiled_since) if c.mode == "xla" else None
    if temp is not None:
        c.info["memory"] = {
            "method": "XLA buffer assignment's temp allocation (tf.function jit_compile=True, "
            "--xla_dump_to), as JAX's memory_analysis()",
            "temp_bytes": temp,
        }
    else:
        c.info["memory"] = {
            "method": f"tf.config.experimental.get_memory_info('{device}') peak during one step, "
            "minus current before",
            "temp_bytes": int(peak - base),
        }


def shape_of(config):
    batch, seq, hidden, num_experts, top_k, width, shared = config
    return {
        "batch": batch,
        "seq": seq,
        "hidden": hidden,
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_width": width,
        "shared_width": shared,
        "dense_width": top_k * width + shared,
    }


def bench_config(name, args, layers):
    config = (SMOKE_CONFIGS if args.smoke else CONFIGS)[name]
    batch, seq, hidden, num_experts, top_k, width, shared = config
    memory = args.memory != "off"
    x, candidates = build_candidates(config, args, layers, memory)
    inner = {}
    for c in candidates:
        if c.error:
            continue
        compiled_since = time.time() - 1
        t = warm_up(c, args)
        if t is None:
            continue
        inner[c.key] = max(1, math.ceil(args.min_time / max(t, 1e-6))) if args.min_time else 1
        if memory and BACKEND == "torch":
            if on_gpu():
                torch_gpu_memory(c)
            if c.mode == "eager":
                torch_saved_bytes(c)
        elif memory and BACKEND == "tensorflow":
            tf_memory(c, compiled_since)
    live = [c for c in candidates if not c.error]
    for _ in range(args.repeats):  # interleaved: A B C A B C ...
        for c in live:
            c.times.append(c.run(inner[c.key]))
    tokens = batch * seq
    # fwd + 2x bwd, 3 matmuls of (d, width) per active expert, shared expert included.
    active_flops = 3 * 2 * tokens * hidden * 3 * (top_k * width + shared)
    rows = []
    for c in candidates:
        row = {
            "config": name,
            "layer": c.layer_name,
            "mode": c.mode,
            "tokens": tokens,
            "shape": shape_of(config),
            "error": c.error,
            "times_ms": [t * 1e3 for t in c.times],
            "load_1min": c.loads,
            "steps_per_measurement": inner.get(c.key),
            **c.info,
        }
        if c.times:
            row["median_ms"] = statistics.median(c.times) * 1e3
            row["min_ms"] = min(c.times) * 1e3
            row["active_tflops"] = active_flops / statistics.median(c.times) / 1e12
        if split_strategy(c.layer_name)[0] in CAPACITY and not c.error:
            if c.finish is not None:
                c.finish()
            dropped = float(ops.convert_to_numpy(c.layer.ffn.dropped_count))
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
    cmd += ["--tf-mode", args.tf_mode, "--torch-mode", "eager", "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
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
    found = {(m["config"], m["layer"]): m for m in json.loads(line[len("MEMORY_JSON ") :])}
    for row in rows:
        m = found.get((row["config"], row["layer"]))
        if m and "temp_bytes" in m and row["mode"] == "eager":
            row["memory"] = {"method": method, "temp_bytes": m["temp_bytes"]}


# ----------------------------------------------------------------------------
# Reporting


def best_rows(rows):
    """One row per (config, layer): the fastest mode (TF: XLA or not; torch: eager or compiled)."""
    best = {}
    for row in rows:
        key = (row["config"], row["layer"])
        cur = best.get(key)
        if cur is None or (
            "median_ms" in row and ("median_ms" not in cur or row["median_ms"] < cur["median_ms"])
        ):
            best[key] = row
    return best


def layer_order(rows):
    """`LAYERS` order, strategy variants (`sparse_moe@...`) after the plain layers."""
    names = list(dict.fromkeys(r["layer"] for r in rows))
    return [n for n in LAYERS if n in names] + [n for n in names if n not in LAYERS]


def mib(n):
    return f"{n / 2**20:.1f}" if n is not None else "—"


def same_mode_temp(rows, config, mode):
    """The dense FFN's step memory in the same mode (memory compares like with like)."""
    for r in rows:
        if r["config"] == config and r["layer"] == "dense_ffn" and r["mode"] == mode:
            return r.get("memory", {}).get("temp_bytes")
    return None


def memory_by_mode(rows):
    """Markdown lines: every mode's step memory and its ratio to the dense FFN's."""
    out = ["", "Step memory by mode (ratios to the dense FFN in the same mode):", ""]
    out += ["| config | layer | mode | step temp MiB | vs dense | allocator peak MiB |"]
    out += ["|---|---|---|---|---|---|"]
    for r in rows:
        temp = r.get("memory", {}).get("temp_bytes")
        dense = same_mode_temp(rows, r["config"], r["mode"])
        out.append(
            f"| {r['config']} | {r['layer']} | {r['mode']} | {mib(temp)} | "
            + (f"{temp / dense:.2f}" if temp and dense else "—")
            + f" | {mib(r.get('allocator_peak_bytes'))} |"
        )
    return out


def load_range(rows):
    loads = [v for r in rows for v in r.get("load_1min", []) if v is not None]
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "—"


def markdown(results):
    dev = results["device"]
    rows = results["rows"]
    best = best_rows(rows)
    torch_col = dev["backend"] == "torch"
    out = [
        f"### {dev['backend']} — {dev['device']} ({dev['framework']}, keras {dev['keras']}, "
        f"keras-hub {dev['keras_hub']}, keras-moe {dev.get('keras_moe', '?')}, "
        f"dtype policy {results['dtype']})",
        "",
        f"Step: `x + FFN(LayerNorm(x))`, gradients of the variables and of `x`. "
        f"keras_moe dropless path: {dev['keras_moe_dropless_path']}. "
        f"Median of {results['repeats']} interleaved repeats; ratios are median / median. "
        f"Machine: {dev['cpu']}; 1-minute load average during the runs "
        f"{load_range(rows)} (column `load`: median during that layer's measurements).",
        "",
    ]
    mode_col = dev["backend"] in ("tensorflow", "torch")
    head = "| config | T | layer |" + (" mode |" if mode_col else "")
    head += (
        " median ms | min ms | active TFLOP/s | vs dense | vs keras-hub | step temp MiB "
        "| temp vs dense |"
    )
    if torch_col:
        head += " saved for bwd MiB |"
    head += " params+opt MiB | dropped | load |"
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    for cfg in configs:
        dense = best.get((cfg, "dense_ffn"), {}).get("median_ms")
        hub = best.get((cfg, "keras_hub_mixtral"), {}).get("median_ms")
        for layer in layer_order(rows):
            row = best.get((cfg, layer))
            if row is None:
                continue
            s = row["shape"]
            label = f"{cfg} (E={s['num_experts']}, k={s['top_k']}, h={s['expert_width']}"
            label += f", shared {s['shared_width']})" if s.get("shared_width") else ")"
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
                n_rest = head.count("|") - 1 - len(cells) - 1
                cells += [f"failed: {row['error']}"] + ["—"] * n_rest
                out.append("| " + " | ".join(cells) + " |")
                continue
            med = row["median_ms"]
            temp = row.get("memory", {}).get("temp_bytes")
            dense_temp = same_mode_temp(rows, cfg, row["mode"])
            state = row["param_bytes"] + row["optimizer_bytes"]
            dropped = row.get("dropped_fraction")
            loads = [v for v in row.get("load_1min", []) if v is not None]
            cells += [
                f"{med:.2f}",
                f"{row['min_ms']:.2f}",
                f"{row['active_tflops']:.3f}",
                f"{med / dense:.2f}" if dense else "—",
                f"{med / hub:.2f}" if hub else "—",
                mib(temp),
                f"{temp / dense_temp:.2f}" if temp and dense_temp else "—",
            ]
            if torch_col:
                cells.append(mib(row.get("saved_for_backward_bytes")))
            cells += [
                mib(state),
                f"{dropped:.1%}" if dropped is not None else "",
                f"{statistics.median(loads):.1f}" if loads else "—",
            ]
            out.append("| " + " | ".join(cells) + " |")
    sweep = [c for c in (SMOKE_SWEEP if results["smoke"] else SWEEP) if c in configs]
    if len(sweep) >= 2:
        tokens = {c: next(r["tokens"] for r in rows if r["config"] == c) for c in sweep}
        head = "| layer | " + " | ".join(f"T={tokens[c]} ms" for c in sweep) + " |"
        quads = [(a, b) for a in sweep for b in sweep if tokens[b] == 4 * tokens[a]]
        head += "".join(f" t({tokens[b]})/t({tokens[a]}) |" for a, b in quads)
        out += ["", "Token sweep (config e8k2); a linear layer gives 4.0 for 4x the tokens:", ""]
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        for layer in layer_order(rows):
            meds = [best.get((c, layer), {}).get("median_ms") for c in sweep]
            if all(m is None for m in meds):
                continue
            cells = [layer] + [f"{m:.2f}" if m else "—" for m in meds]
            for a, b in quads:
                ta = best.get((a, layer), {}).get("median_ms")
                tb = best.get((b, layer), {}).get("median_ms")
                cells.append(f"{tb / ta:.2f}" if ta and tb else "—")
            out.append("| " + " | ".join(cells) + " |")
    if dev["backend"] == "tensorflow" and len({r["mode"] for r in rows}) > 1:
        out += memory_by_mode(rows)
    methods = sorted({r["memory"]["method"] for r in rows if "memory" in r})
    out += ["", "Memory (`step temp`): " + ("; ".join(methods) if methods else "not measured") + "."]
    if dev["backend"] == "jax":
        out.append(
            "JAX 'step temp' is XLA's temp_size_in_bytes (scratch beyond arguments/outputs, "
            "which hold params, optimizer state, input and input gradient)."
        )
    if dev["backend"] == "tensorflow":
        out.append(
            "TensorFlow with XLA: the allocator's peak also holds the new values of every updated "
            "variable and optimizer slot (XLA writes them to fresh buffers), E/k times more for an "
            "MoE; the XLA temp excludes them like JAX's. Without XLA: the allocator's peak."
        )
    if torch_col:
        out.append(
            "`saved for bwd`: bytes of the tensors autograd keeps for the backward pass "
            "(`torch.autograd.graph.saved_tensors_hooks`, storages counted once, variables and input excluded)."
        )
    return "\n".join(out)


def result_paths(args, desc):
    parts = [device_slug(desc), BACKEND]
    if args.dtype != "float32":
        parts.append(args.dtype)
    if args.tag:
        parts.append(args.tag)
    stem = os.path.join(args.results_dir, "_".join(parts))
    return stem + ".md", stem + ".json"


def set_threads(threads):
    if not threads:
        return
    if BACKEND == "torch":
        import torch

        torch.set_num_threads(threads)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)


def write_results(args, results, quiet=False):
    """The markdown table (printed unless `quiet`) and the JSON, to `--results-dir` / `--out`."""
    table = markdown(results)
    if not quiet:
        print()
        print(table)
    results["markdown"] = table
    paths = [args.out] if args.out else []
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        md_path, json_path = result_paths(args, results["device"])
        with open(md_path, "w") as f:
            f.write(
                f"<!-- written by benchmarks/layer_speed.py {' '.join(sys.argv[1:])} on "
                f"{results['date']} -->\n\n{table}\n"
            )
        paths.append(json_path)
        if not quiet:
            print(f"\nwrote {md_path}")
    for path in paths:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        if not quiet:
            print(f"wrote {path}")


def main(args):
    keras.config.set_dtype_policy(args.dtype)
    set_threads(args.threads)
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
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load_before": load_average(),
        "rows": [],
    }
    print(f"# {results['device']}", flush=True)
    for i, name in enumerate(args.configs):
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
        if i + 1 < len(args.configs):
            # Results so far, in case a later config does not finish.
            write_results(args, results, quiet=True)
    if args.memory == "auto" and not on_gpu() and BACKEND == "torch":
        rss_memory(args, results["rows"])
    write_results(args, results)
    for r in results["rows"]:
        if r["error"]:
            print(f"failed: {r['config']} {r['layer']} {r['mode']}: {r['error']}", file=sys.stderr)
    # A layer fails the run only if no mode of it ran (TF: XLA or not).
    if any("median_ms" not in r for r in best_rows(results["rows"]).values()):
        sys.exit(1)


if __name__ == "__main__":
    main(ARGS)
