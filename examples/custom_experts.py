"""Custom experts: your own stacked-expert layer inside keras_moe's MoE layer.

`keras_moe.layers.MoE` runs any router's plan through any experts layer that
follows the expert protocol (`keras_moe.experts.base`). The easiest way to
write one is to subclass `keras_moe.experts.Experts`: store the `E` experts
as stacked variables and write their formula once, with `layout.linear`
for each per-expert matrix and `layout.param` for other per-expert
parameters; the base class runs that formula on capacity buffers and on the
per-expert rows of dropless dispatch, so only the chosen experts compute.

Here each expert is a deeper, narrower network than `StackedExperts`' FFN,
`gain_e * W3_e tanh(W2_e relu(W1_e x + b1_e))` with hidden widths 48 and 24.
The script trains the same model in dropless and in capacity mode on a
regression task, saves and reloads it, and checks the reloaded outputs.

    python examples/custom_experts.py            # full run, about a minute on 2 CPU cores
    KERAS_BACKEND=tensorflow python examples/custom_experts.py --smoke
"""

import argparse
import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_moe  # noqa: E402

SEQ, INPUT_DIM, HIDDEN, NUM_EXPERTS = 8, 16, 32, 8


@keras.saving.register_keras_serializable(package="custom_experts")
class DeepExperts(keras_moe.experts.Experts):
    """`E` experts `gain_e * W3_e tanh(W2_e relu(W1_e x + b1_e))`, stacked."""

    def __init__(self, num_experts, widths=(48, 24), **kwargs):
        super().__init__(num_experts, **kwargs)
        self.widths = tuple(widths)

    def build(self, input_shape):
        d, E = input_shape[-1], self.num_experts
        (w1, w2), init = self.widths, keras_moe.experts.StackedInitializer("glorot_uniform")
        self.w1 = self.add_weight(name="w1", shape=(E, d, w1), initializer=init)
        self.b1 = self.add_weight(name="b1", shape=(E, w1), initializer="zeros")
        self.w2 = self.add_weight(name="w2", shape=(E, w1, w2), initializer=init)
        self.w3 = self.add_weight(name="w3", shape=(E, w2, d), initializer=init)
        self.gain = self.add_weight(name="gain", shape=(E,), initializer="ones")

    def expert_call(self, x, layout, training=None):
        h = ops.relu(layout.linear(x, self.w1, self.b1))
        h = ops.tanh(layout.linear(h, self.w2))
        return layout.linear(h, self.w3) * layout.param(self.gain)

    def get_config(self):
        return {**super().get_config(), "widths": self.widths}


def build_model(capacity_factor):
    inputs = keras.Input((SEQ, INPUT_DIM))
    h = keras.layers.Dense(HIDDEN)(inputs)
    moe = keras_moe.layers.MoE(
        router=keras_moe.routers.TopKRouter(NUM_EXPERTS, top_k=2),
        experts=DeepExperts(NUM_EXPERTS),
        capacity_factor=capacity_factor,
        name="moe",
    )
    h = h + moe(keras.layers.LayerNormalization()(h))
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def make_data(n, rng):
    x = rng.normal(size=(n, SEQ, INPUT_DIM)).astype("float32")
    region = (x[..., 0] > 0) * 2 + (x[..., 1] > 0)  # 4 regions, each its own rule
    w = rng.normal(size=(4, INPUT_DIM)).astype("float32")
    y = np.sin(np.einsum("nsd,nsd->ns", x, w[region]))[..., None]
    return x, y.astype("float32")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny data, 1 epoch (CI)")
    args = parser.parse_args()
    n, epochs = (32, 1) if args.smoke else (4096, 15)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = make_data(n, rng)
    x_val, y_val = make_data(max(16, n // 4), rng)
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}")
    status = 0
    for capacity_factor in (None, 1.25):
        model = build_model(capacity_factor)
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
        model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
        mse = float(model.evaluate(x_val, y_val, verbose=0))
        mode = "dropless" if capacity_factor is None else f"capacity factor {capacity_factor}"
        print(f"{mode:>20}: validation MSE {mse:.4f} (target variance {y_val.var():.4f})")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "custom_experts.keras")
            model.save(path)
            reloaded = keras.models.load_model(path)
        diff = float(np.max(np.abs(model.predict(x_val, verbose=0) - reloaded.predict(x_val, verbose=0))))
        print(f"{'':>20}  saved and reloaded: max |difference| = {diff:.1e}")
        status |= not diff <= 1e-6
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
