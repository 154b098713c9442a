import inspect
import re
import textwrap

import numpy as np
import pytest
import keras

from keras_moe.layers import CGC
from keras_moe.layers import MMoE
from keras_moe.layers import PLE
from keras_moe.models import MultiTaskModel

TASKS = {"click": "binary", "price": "regression", "genre": 3}


def _data(n=64, features=5):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, features)).astype("float32")
    labels = {
        "click": (x[:, :1] + x[:, 1:2] > 0).astype("float32"),
        "price": (2.0 * x[:, 2:3] - x[:, :1]).astype("float32"),
        "genre": np.argmax(x[:, 2:5], axis=-1).astype("int32"),
    }
    return x, labels


MIXTURES = {
    "mmoe": lambda: MMoE(3, 4, 8),
    "cgc": lambda: CGC(3, 1, 2, 8),
    "ple": lambda: PLE(3, 2, 1, 1, 8),
    "omoe": lambda: MMoE(1, 4, 8),
    "shared_bottom": lambda: keras.layers.Dense(8, activation="relu"),
}


@pytest.mark.parametrize("mixture", sorted(MIXTURES))
def test_outputs_are_keyed_by_task(mixture):
    model = MultiTaskModel(5, TASKS, MIXTURES[mixture](), tower_units=[4])
    x, _ = _data(8)
    outputs = model.predict(x, verbose=0)
    assert sorted(outputs) == sorted(TASKS)
    assert outputs["click"].shape == (8, 1)
    assert ((outputs["click"] > 0) & (outputs["click"] < 1)).all()
    assert outputs["price"].shape == (8, 1)
    assert outputs["genre"].shape == (8, 3)
    np.testing.assert_allclose(outputs["genre"].sum(-1), 1.0, atol=1e-5)
    assert model.task_names == list(TASKS)


def test_towers_per_task():
    model = MultiTaskModel(
        5,
        {"a": "binary", "b": "regression"},
        MMoE(2, 3, 6),
        tower_units={"a": [4, 2], "b": []},
    )
    names = {layer.name for layer in model.layers}
    assert {"a_tower_0", "a_tower_1", "a_head", "b_head"} <= names
    assert "b_tower_0" not in names


def test_two_task_fit_loss_falls():
    x, labels = _data(128)
    labels = {"click": labels["click"], "price": labels["price"]}
    model = MultiTaskModel(
        5,
        {"click": "binary", "price": "regression"},
        MMoE(2, 4, 8),
        tower_units=[4],
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss={"click": "binary_crossentropy", "price": "mse"},
        loss_weights={"click": 1.0, "price": 0.5},
    )
    history = model.fit(x, labels, epochs=8, batch_size=32, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0]
    assert "click_loss" in history.history and "price_loss" in history.history


def test_loss_weights_weigh_the_task_losses():
    x, labels = _data(32)
    model = MultiTaskModel(5, TASKS, PLE(3, 1, 1, 1, 4))
    model.compile(
        loss={
            "click": "binary_crossentropy",
            "price": "mse",
            "genre": "sparse_categorical_crossentropy",
        },
        loss_weights={"click": 1.0, "price": 0.25, "genre": 2.0},
    )
    result = model.evaluate(x, labels, batch_size=32, verbose=0, return_dict=True)
    expected = (
        result["click_loss"]
        + 0.25 * result["price_loss"]
        + 2.0 * result["genre_loss"]
    )
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-4)


def test_mixed_precision_heads_in_float32():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = MultiTaskModel(5, TASKS, MMoE(3, 4, 8), tower_units=[4])
    x, _ = _data(8)
    outputs = model.predict(x, verbose=0)
    assert {str(v.dtype) for v in outputs.values()} == {"float32"}
    np.testing.assert_allclose(outputs["genre"].sum(-1), 1.0, atol=1e-5)


def test_get_config_round_trip():
    model = MultiTaskModel(
        5, TASKS, PLE(3, 2, 1, 1, 6), tower_units=[4], tower_activation="tanh"
    )
    config = model.get_config()
    restored = MultiTaskModel.from_config(config)
    assert restored.get_config() == config
    restored.set_weights(model.get_weights())
    x, _ = _data(8)
    expected = model.predict(x, verbose=0)
    actual = restored.predict(x, verbose=0)
    for name in TASKS:
        np.testing.assert_allclose(actual[name], expected[name], atol=1e-6)


@pytest.mark.parametrize("mixture", ["mmoe", "ple", "shared_bottom"])
def test_save_and_load(mixture, tmp_path):
    model = MultiTaskModel(5, TASKS, MIXTURES[mixture](), tower_units=[4])
    model.compile(
        optimizer="adam",
        loss={
            "click": "binary_crossentropy",
            "price": "mse",
            "genre": "sparse_categorical_crossentropy",
        },
    )
    x, labels = _data(32)
    model.fit(x, labels, epochs=1, batch_size=32, verbose=0)
    expected = model.predict(x, verbose=0)
    path = tmp_path / "multi_task.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, MultiTaskModel)
    actual = restored.predict(x, verbose=0)
    for name in TASKS:
        np.testing.assert_allclose(actual[name], expected[name], atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(input_dim=0), "input_dim"),
        (dict(tasks={}), "tasks"),
        (dict(tasks=["a", "b"]), "tasks"),
        (dict(tasks={"a": "binary", "b": "ranking"}), "tasks"),
        (dict(tasks={"a": "binary", "b": 1}), "tasks"),
        (dict(mixture="mmoe"), "mixture"),
        (dict(mixture=MMoE(3, 2, 4)), "mixture"),
        (dict(tower_units=[4, 0]), "tower_units"),
        (dict(tower_units={"a": [4]}), "tower_units"),
        (dict(tower_units={"a": [4], "c": [4]}), "tower_units"),
    ],
)
def test_invalid_arguments(kwargs, argument):
    args = dict(
        input_dim=5,
        tasks={"a": "binary", "b": "regression"},
        mixture=MMoE(2, 2, 4),
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"`{argument}"):
        MultiTaskModel(**args)


def _run_docstring_example(obj):
    """Runs the fenced Python code of `obj`'s docstring `Example:`."""
    doc = inspect.getdoc(obj)
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    assert blocks, f"{obj.__name__} has no Example code"
    for block in blocks:
        code = textwrap.dedent(block)
        exec(compile(code, f"<{obj.__name__} docstring>", "exec"), {})


def test_docstring_example_runs():
    _run_docstring_example(MultiTaskModel)
