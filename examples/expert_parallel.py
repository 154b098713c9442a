"""Expert parallelism: experts split over devices, tokens exchanged all-to-all.

On JAX (the default here) the script trains a small MoE language-model-like
stack under `keras_moe.distribution.expert_parallel` on a device mesh, checks
that every device holds only its share of the expert weights, lists the
collectives of the compiled training step (an all-to-all moves the tokens; no
expert kernel is gathered) and, without `--smoke`, prints a table of the
per-device expert memory and step time for several mesh shapes in capacity
and dropless mode.

On a CPU-only machine the mesh is made of 8 simulated devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set below before JAX
starts); they share the machine's cores, so step times only show overheads,
not speed-ups. The same code runs unchanged on a host with 8 GPUs or TPU
chips, and across hosts after `keras.distribution.initialize()` (see the
"Scaling out" docs page).

TensorFlow: Keras' distribution backend for TensorFlow is a prototype, so the
script shows the TensorFlow DTensor rendering instead: the same layout on 8
logical CPU devices, the experts' kernels as sharded `DVariable`s, and the
layer's output computed with them. PyTorch: Keras has no distribution backend
for PyTorch; the script says so and trains on one device.

    KERAS_BACKEND=jax python examples/expert_parallel.py            # table, a few minutes
    KERAS_BACKEND=jax python examples/expert_parallel.py --smoke    # seconds
    KERAS_BACKEND=tensorflow python examples/expert_parallel.py --smoke
"""

import argparse
import contextlib
import os
import re
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
DEVICES = 8
if os.environ["KERAS_BACKEND"] == "jax" and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Simulated devices for CPU-only machines; JAX reads this when it starts.
    # On GPU/TPU hosts JAX still uses the accelerators.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
    ).strip()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_moe  # noqa: E402


def configure_tensorflow():
    """8 logical CPU devices for DTensor; only possible before TF starts."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * DEVICES)


def build_model(config, mode):
    """Embedding -> 2 x (SparseMoE + residual) -> logits."""
    capacity = {"capacity_factor": 1.25, "group_size": config["group_size"]} if mode == "capacity" else {}
    tokens = keras.Input((config["length"],), dtype="int32")
    h = keras.layers.Embedding(config["vocab"], config["hidden"], name="embed")(tokens)
    for i in range(2):
        normed = keras.layers.LayerNormalization(name=f"norm_{i}")(h)
        h = h + keras_moe.layers.SparseMoE(
            config["experts"], config["width"], top_k=2, gated=True, activation="silu",
            name=f"moe_{i}", **capacity,
        )(normed)
    logits = keras.layers.Dense(config["vocab"], name="logits")(h)
    return keras.Model(tokens, logits)


def make_data(config, num_sequences, seed=0):
    """Token sequences whose next token depends on the current one."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, config["vocab"], size=config["vocab"])
    x = rng.integers(0, config["vocab"], size=(num_sequences, config["length"])).astype("int32")
    return x, table[x].astype("int32")


def make_mesh(shape):
    """A `DeviceMesh` of `shape`: `(n,)` is `("expert",)`, 2-D `("batch", "expert")`."""
    devices = keras.distribution.list_devices()[: int(np.prod(shape))]
    names = ["expert"] if len(shape) == 1 else ["batch", "expert"]
    return keras.distribution.DeviceMesh(shape, names, devices)


def make_distribution(shape):
    mesh = make_mesh(shape)
    batch_axis = "expert" if len(shape) == 1 else "batch"
    return keras_moe.distribution.expert_parallel(mesh, expert_axis="expert", batch_axis=batch_axis)


def expert_bytes_per_device(model):
    """Bytes of expert variables stored on each device (the largest)."""
    per_device = {}
    for variable in model.variables:
        if "/experts/" not in variable.path:
            continue
        for shard in variable.value.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


def collectives(hlo):
    """Counts of each collective in compiled HLO text."""
    kinds = re.findall(r"\s(all-to-all|all-gather|all-reduce|collective-permute|reduce-scatter)(?:-start)?\(", hlo)
    return {kind: kinds.count(kind) for kind in sorted(set(kinds))}


def compiled_step(model, distribution, x, y):
    """Keras' training step compiled for the mesh: HLO text and memory."""
    import jax

    model.optimizer.build(model.trainable_variables)
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    data = (x, y)
    if distribution is not None:
        data = jax.tree.map(
            lambda a: jax.device_put(a, distribution.get_data_layout(a.shape).backend_layout), data
        )
    compiled = jax.jit(model.train_step).lower(state, data).compile()
    return compiled.as_text(), compiled.memory_analysis()


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])  # waits for the step
        self.times.append(time.perf_counter() - self.start)


def run_jax(config, shape, mode, steps):
    """Trains under `shape` (`None`: one device); returns one table row."""
    distribution = None if shape is None else make_distribution(shape)
    scope = distribution.scope() if distribution else contextlib.nullcontext()
    x, y = make_data(config, config["batch"] * steps)
    with scope:
        keras.utils.set_random_seed(0)
        model = build_model(config, mode)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        hlo, memory = compiled_step(model, distribution, x[: config["batch"]], y[: config["batch"]])
        timer = StepTimer()
        history = model.fit(x, y, batch_size=config["batch"], epochs=1, verbose=0, callbacks=[timer])
        expert_bytes = (
            expert_bytes_per_device(model)
            if distribution
            else sum(v.value.nbytes for v in model.variables if "/experts/" in v.path)
        )
    times = timer.times[1:] or timer.times  # the first step compiles
    return {
        "mesh": "1 device" if shape is None else "x".join(map(str, shape)),
        "mode": mode,
        "expert_kib_per_device": expert_bytes / 1024,
        "temp_mib_per_device": memory.temp_size_in_bytes / 2**20 if memory else float("nan"),
        "step_ms": 1000 * float(np.median(times)),
        "loss": float(history.history["loss"][-1]),
        "collectives": collectives(hlo),
    }


def print_table(rows):
    print(
        "| mesh (simulated devices) | mode | expert weights per device (KiB) | XLA temp per device (MiB) "
        "| step (ms) | collectives in the train step |"
    )
    print("|---|---|---:|---:|---:|---|")
    for row in rows:
        found = ", ".join(f"{k} x{v}" for k, v in row["collectives"].items()) or "none"
        print(
            f"| {row['mesh']} | {row['mode']} | {row['expert_kib_per_device']:.0f} "
            f"| {row['temp_mib_per_device']:.1f} | {row['step_ms']:.1f} | {found} |"
        )


def main_jax(args):
    import jax

    count = len(keras.distribution.list_devices())
    print(f"JAX {jax.__version__}, {count} {jax.default_backend()} devices")
    if args.smoke:
        config = dict(vocab=32, length=8, hidden=16, width=32, experts=count, batch=count, group_size=8)
        meshes, modes, steps = [(count,)], ["dropless"], 2
    else:
        config = dict(vocab=256, length=64, hidden=128, width=256, experts=8, batch=32, group_size=64)
        meshes = [None, (count,), (2, count // 2), (count // 2, 2)]
        if args.meshes:
            meshes = [None if m == "1" else tuple(int(n) for n in m.split("x")) for m in args.meshes]
        modes, steps = args.modes, args.steps
    rows = []
    for mode in modes:
        for shape in meshes:
            row = run_jax(config, shape, mode, steps)
            rows.append(row)
            print(f"  {row['mesh']:>8} {mode:>8}: {row['step_ms']:.1f} ms/step, loss {row['loss']:.3f}", flush=True)
            if shape is not None:
                if "all-to-all" not in row["collectives"]:
                    print("FAILED: no all-to-all in the compiled training step", file=sys.stderr)
                    return 1
    print_table(rows)
    return 0


def main_tensorflow(args):
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    mesh = dtensor.create_mesh([("batch", 2), ("expert", 4)], device_type="CPU")
    layer = keras_moe.layers.SparseMoE(8, 32, gated=True, capacity_factor=2.0, group_size=4, name="moe")
    x = np.random.default_rng(0).normal(size=(8, 4, 16)).astype("float32")
    want = np.asarray(layer(x))
    layouts = keras_moe.distribution.dtensor_layouts(layer, mesh)
    variables = keras_moe.distribution.dtensor_variables(layer, layouts)
    for path in ("moe/experts/up_kernel", "moe/router/kernel"):
        shards = dtensor.unpack(tf.convert_to_tensor(variables[path]))
        print(f"{path}: layout {layouts[path].sharding_specs}, device 0 stores {tuple(shards[0].shape)}")

    # Routing and slots as usual; the experts on the mesh with DVariables.
    groups = tf.reshape(tf.constant(x), (-1, 4, 16))
    plan = layer.router(groups)
    capacity = keras_moe.dispatch.compute_capacity(2.0, 4, 2, 8)
    slots, dispatched = keras_moe.dispatch.capacity_slots(plan.expert_indices, plan.dispatch_mask, 8, capacity)
    buffer = keras_moe.dispatch.gather_slots(groups, slots, 8, capacity)
    layout = dtensor.Layout(["batch", "expert", dtensor.UNSHARDED, dtensor.UNSHARDED], mesh)
    buffer = dtensor.relayout(dtensor.copy_to_mesh(buffer, dtensor.Layout.replicated(mesh, 4)), layout)
    mapping = [(v, variables[v.path]) for v in layer.experts.variables]

    @tf.function
    def run_experts(buffer):
        with keras.StatelessScope(state_mapping=mapping):
            return layer.experts(buffer)

    y = dtensor.unpack(dtensor.relayout(run_experts(buffer), dtensor.Layout.replicated(mesh, 4)))[0]
    got = np.reshape(keras_moe.dispatch.combine_slots(y, slots, plan.expert_weights, dispatched), x.shape)
    error = float(np.max(np.abs(got - want)))
    print(f"DTensor experts vs one device: max |difference| = {error:.2e}")
    return 0 if error < 1e-5 else 1


def main_torch(args):
    print(
        "Keras has no distribution backend for PyTorch (keras.distribution runs on JAX; "
        "TensorFlow via DTensor). Training on one device."
    )
    config = dict(vocab=32, length=8, hidden=16, width=32, experts=8, batch=8, group_size=8)
    model = build_model(config, "dropless")
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = make_data(config, 16)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    print(f"loss {history.history['loss'][-1]:.3f}")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, one mesh (seconds)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per mesh (full run)")
    parser.add_argument(
        "--meshes", nargs="*", help="mesh shapes of the full run, e.g. 1 8 2x4 (1: one device)"
    )
    parser.add_argument(
        "--modes", nargs="*", default=["dropless", "capacity"], choices=["dropless", "capacity"]
    )
    args = parser.parse_args()
    backend = keras.backend.backend()
    if backend == "jax":
        return main_jax(args)
    if backend == "tensorflow":
        return main_tensorflow(args)
    return main_torch(args)


if __name__ == "__main__":
    if keras.backend.backend() == "tensorflow":
        configure_tensorflow()
    sys.exit(main())
