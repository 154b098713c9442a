"""Writes the multi-task fixtures: MMoE, CGC, PLE and a MultiTaskModel saved on each backend.

The fixtures were written with the layers as they were before the multi-task
layers were refactored onto one base (issue 12), so that models saved by
earlier releases keep loading. Do not regenerate them unless the saved format
is meant to change. Run once per backend from the repository root:

    for b in jax tensorflow torch; do KERAS_BACKEND=$b python tests/data/make_multitask_fixtures.py; done

Each run writes `multitask_layers_<backend>.keras` (a functional model with
MMoE, a CGC fed by a lower CGC's streams, and PLE with its gates),
`multitask_model_<backend>.keras` (a `MultiTaskModel` over a PLE mixture)
and `multitask_<backend>.npz` (the inputs and the outputs the saving backend
computed).
"""

import os

import keras
import numpy as np

import keras_moe

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = {"click": "binary", "price": "regression", "genre": 3}


def build_layers_model():
    inputs = keras.Input((6,))
    mmoe = keras_moe.layers.MMoE(
        2, 3, [5, 4], gate_units=[3], dropout=0.1, kernel_regularizer="l2", name="mmoe"
    )(inputs)
    streams = keras_moe.layers.CGC(
        2, 1, 1, 4, shared_output=True, gate_initializer="he_normal", name="lower"
    )(inputs)
    cgc = keras_moe.layers.CGC(2, 1, 2, 3, gate_initializer="he_normal", name="upper")(streams)
    ple, gates = keras_moe.layers.PLE(
        2, 2, 1, 2, [5, 4], gate_units=[3], gate_initializer="glorot_uniform", name="ple"
    )(inputs, return_gates=True)
    return keras.Model(inputs, mmoe + cgc + ple + gates[0] + gates[1])


def build_multi_task_model():
    return keras_moe.models.MultiTaskModel(
        6,
        TASKS,
        keras_moe.layers.PLE(3, 2, 1, 1, [8], gate_initializer="glorot_uniform", name="ple"),
        tower_units={"click": [4], "price": [], "genre": [5, 4]},
        name="multi_task",
    )


def main():
    backend = keras.backend.backend()
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).standard_normal((5, 6)).astype("float32")
    layers_model = build_layers_model()
    task_model = build_multi_task_model()
    layers_y = [keras.ops.convert_to_numpy(y) for y in layers_model(x)]
    task_y = {name: keras.ops.convert_to_numpy(y) for name, y in task_model(x).items()}
    layers_model.save(os.path.join(HERE, f"multitask_layers_{backend}.keras"))
    task_model.save(os.path.join(HERE, f"multitask_model_{backend}.keras"))
    np.savez(
        os.path.join(HERE, f"multitask_{backend}.npz"),
        x=x,
        **{f"layers_{i}": y for i, y in enumerate(layers_y)},
        **{f"model_{name}": y for name, y in task_y.items()},
    )
    print(f"wrote multi-task fixtures for {backend}")


if __name__ == "__main__":
    main()
