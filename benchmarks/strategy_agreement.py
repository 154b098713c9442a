"""Do the dropless strategies agree on this device? (a check, not a timing)

Runs one training step of `SparseMoE` (loss, input gradient, every variable's
gradient) once per dropless strategy and prints each one's largest
difference from the first. Meant for devices the test suite does not run on
(GPUs: the `"batched"` / `"grouped"` paths, `torch._grouped_mm`, JAX's
Pallas kernels), before trusting their timings.

    KERAS_BACKEND=jax python benchmarks/strategy_agreement.py --strategies scan grouped grouped:pallas batched
    KERAS_BACKEND=torch python benchmarks/strategy_agreement.py --strategies ranges grouped batched

Exits 1 if a strategy fails or differs by more than `--tolerance` (relative to
the largest value of that quantity).
"""

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--strategies", nargs="+", required=True)
    p.add_argument("--dtype", default="mixed_bfloat16")
    p.add_argument("--shape", nargs=6, type=int, default=[2, 256, 256, 8, 2, 256],
                   metavar=("BATCH", "SEQ", "HIDDEN", "E", "K", "WIDTH"))
    p.add_argument("--shared", type=int, default=0, help="shared expert width")
    p.add_argument("--tolerance", type=float, default=None,
                   help="default 2e-2 for 16-bit compute dtypes, 1e-4 otherwise")
    return p.parse_args(argv)


def main(args):
    import keras
    import numpy as np

    sys.path.insert(0, REPO_ROOT)
    import keras_moe

    keras.config.set_dtype_policy(args.dtype)
    backend = keras.backend.backend()
    batch, seq, hidden, num_experts, top_k, width = args.shape
    x = np.random.default_rng(0).standard_normal((batch, seq, hidden)).astype("float32")
    low = keras.config.dtype_policy().compute_dtype in ("bfloat16", "float16")
    tolerance = args.tolerance or (2e-2 if low else 1e-4)
    results, failed = {}, False
    for strategy in args.strategies:
        name, _, kernel = strategy.partition(":")
        os.environ["KERAS_MOE_DROPLESS_STRATEGY"] = name
        if kernel:
            os.environ["KERAS_MOE_GROUPED_MATMUL"] = kernel
        else:
            os.environ.pop("KERAS_MOE_GROUPED_MATMUL", None)
        keras.utils.set_random_seed(1)
        layer = keras_moe.layers.SparseMoE(
            num_experts, width, top_k=top_k, gated=True, activation="silu",
            shared_intermediate_dim=args.shared,
        )
        layer.build(x.shape)
        try:
            results[strategy] = step(layer, x, backend)
        except Exception as e:  # noqa: BLE001
            failed = True
            print(f"{strategy}: FAILED {e.__class__.__name__}: {str(e).splitlines()[0][:300]}")
    if not results:
        return 1
    ref_name = next(iter(results))
    ref = results[ref_name]
    for strategy, out in results.items():
        worst = 0.0
        for a, b in zip(out, ref):
            scale = max(float(np.abs(b).max()), 1e-12)
            worst = max(worst, float(np.abs(a - b).max()) / scale)
        ok = np.isfinite(out[0]).all() and worst <= tolerance
        failed |= not ok
        print(f"{strategy}: loss {float(out[0]):.6g}, largest relative difference from "
              f"{ref_name} {worst:.2e} {'ok' if ok else 'DIFFERS'}")
    return 1 if failed else 0


def step(layer, x, backend):
    """(loss, d loss / d x, d loss / d variables...) as float32 numpy arrays."""
    import numpy as np
    from keras import ops

    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss_fn(trainable, x):
            y, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
            return ops.mean(ops.square(ops.cast(y, "float32")))

        loss, (grads, grad_x) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
            trainable, x
        )
    elif backend == "torch":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        xt = torch.tensor(x, device=device, requires_grad=True)
        loss = ops.mean(ops.square(ops.cast(layer(xt, training=True), "float32")))
        loss.backward()
        grad_x, grads = xt.grad, [v.value.grad for v in layer.trainable_variables]
    else:
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = ops.mean(ops.square(ops.cast(layer(xt, training=True), "float32")))
        *grads, grad_x = tape.gradient(loss, layer.trainable_variables + [xt])
    out = [loss, grad_x, *grads]
    return [np.asarray(ops.convert_to_numpy(ops.cast(t, "float32"))) for t in out]


if __name__ == "__main__":
    sys.exit(main(parse_args()))
