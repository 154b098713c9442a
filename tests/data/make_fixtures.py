"""Writes the cross-backend fixtures: a small model saved on each backend.

Run once per backend from the repository root:
    for b in jax tensorflow torch; do KERAS_BACKEND=$b python tests/data/make_fixtures.py; done
Each run writes `sparse_moe_<backend>.keras` and `sparse_moe_<backend>.npz`
(inputs and the outputs the saving backend computed).
"""

import os

import keras
import numpy as np

import keras_moe

HERE = os.path.dirname(os.path.abspath(__file__))


def build_model():
    inputs = keras.Input((6, 8))
    x = keras_moe.layers.SparseMoE(
        4, 16, gated=True, activation="silu", router_bias=True,
        shared_intermediate_dim=8, shared_expert_gate=True, name="moe",
    )(inputs)
    x = keras_moe.layers.SwitchFFN(4, 16, use_bias=True, group_size=6, name="switch")(x)
    return keras.Model(inputs, x)


def main():
    backend = keras.backend.backend()
    keras.utils.set_random_seed(0)
    model = build_model()
    model.get_layer("moe").router.expert_bias.assign(np.array([0.05, -0.05, 0.0, 0.1], "float32"))
    x = np.random.default_rng(0).standard_normal((3, 6, 8)).astype("float32")
    y = keras.ops.convert_to_numpy(model(x))
    model.save(os.path.join(HERE, f"sparse_moe_{backend}.keras"))
    np.savez(os.path.join(HERE, f"sparse_moe_{backend}.npz"), x=x, y=y)
    print(f"wrote fixtures for {backend}")


if __name__ == "__main__":
    main()
