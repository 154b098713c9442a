import numpy as np
import pytest
import keras

from keras_moe.layers import CGC
from keras_moe.layers import MMoE
from keras_moe.layers import PLE
from keras_moe.models import MultiTaskModel
from keras_moe.models import SharedBottomModel

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
    # Compiled again on load, with the same losses.
    assert restored.compiled
    np.testing.assert_allclose(
        restored.evaluate(x, labels, verbose=0),
        model.evaluate(x, labels, verbose=0),
        rtol=1e-5,
    )


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



# Task names out of alphabetical order: Keras flattens dict outputs sorted by
# key, so lists paired by position would reach the wrong heads.
UNSORTED = {"zeta": "regression", "alpha": "regression"}


def _unsorted_data(n=64):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 5)).astype("float32")
    y_zeta = (3.0 * x[:, :1] + 1.0).astype("float32")
    y_alpha = (-x[:, 1:2]).astype("float32")
    return x, y_zeta, y_alpha


def _unsorted_model():
    return MultiTaskModel(5, UNSORTED, MMoE(2, 3, 4), tower_units=[4], name="unsorted")


def test_predict_and_call_return_dicts_in_tasks_order():
    model = _unsorted_model()
    x, _, _ = _unsorted_data(8)
    assert list(model.predict(x, verbose=0)) == ["zeta", "alpha"]
    assert list(model.predict_on_batch(x)) == ["zeta", "alpha"]
    assert list(model(x)) == ["zeta", "alpha"]


def test_label_lists_follow_tasks_order_in_evaluate():
    model = _unsorted_model()
    model.compile(loss={"zeta": "mse", "alpha": "mae"})
    x, y_zeta, y_alpha = _unsorted_data()
    by_name = model.evaluate(
        x, {"alpha": y_alpha, "zeta": y_zeta}, verbose=0, return_dict=True
    )
    by_position = model.evaluate(x, [y_zeta, y_alpha], verbose=0, return_dict=True)
    assert by_name["zeta_loss"] != pytest.approx(by_name["alpha_loss"])
    for key in ("loss", "zeta_loss", "alpha_loss"):
        np.testing.assert_allclose(by_position[key], by_name[key], rtol=1e-5)


def test_lists_of_labels_and_losses_train_the_heads_of_their_tasks():
    x, y_zeta, y_alpha = _unsorted_data()
    by_name = _unsorted_model()
    by_position = _unsorted_model()
    by_position.set_weights(by_name.get_weights())
    by_name.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss={"zeta": "mse", "alpha": "mae"},
        loss_weights={"zeta": 1.0, "alpha": 0.5},
        metrics={"zeta": ["mae"], "alpha": ["mse"]},
    )
    by_position.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=["mse", "mae"],
        loss_weights=[1.0, 0.5],
        metrics=[["mae"], ["mse"]],
    )
    weights = np.linspace(0.5, 1.5, len(x)).astype("float32")
    a = by_name.fit(
        x,
        {"zeta": y_zeta, "alpha": y_alpha},
        sample_weight={"zeta": weights, "alpha": weights[::-1]},
        validation_data=(x, {"zeta": y_zeta, "alpha": y_alpha}),
        epochs=2,
        batch_size=16,
        shuffle=False,
        verbose=0,
    ).history
    b = by_position.fit(
        x,
        (y_zeta, y_alpha),
        sample_weight=(weights, weights[::-1]),
        validation_data=(x, [y_zeta, y_alpha]),
        epochs=2,
        batch_size=16,
        shuffle=False,
        verbose=0,
    ).history
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=key)
    for expected, actual in zip(by_name.get_weights(), by_position.get_weights()):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "compile_kwargs, argument",
    [
        (dict(loss=["mse"]), "loss"),
        (dict(loss="mse", loss_weights=[1.0, 2.0, 3.0]), "loss_weights"),
        (dict(loss="mse", metrics=["mae"]), "metrics"),
    ],
)
def test_lists_of_the_wrong_length_are_refused(compile_kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`.*one entry per task.*zeta"):
        _unsorted_model().compile(**compile_kwargs)


@pytest.mark.parametrize(
    "labels, message",
    [
        (lambda y_z, y_a: [y_z], "one entry per task"),
        (lambda y_z, y_a: y_z, "dict keyed by task name"),
        (lambda y_z, y_a: {"zeta": y_z, "beta": y_a}, "Unknown keys: \\['beta'\\]"),
    ],
)
def test_labels_that_match_no_task_are_refused(labels, message):
    model = _unsorted_model()
    model.compile(loss="mse")
    x, y_zeta, y_alpha = _unsorted_data(16)
    with pytest.raises(ValueError, match=message):
        model.fit(x, labels(y_zeta, y_alpha), epochs=1, verbose=0)


def test_single_task_accepts_plain_labels_and_metric_lists():
    model = MultiTaskModel(5, {"price": "regression"}, MMoE(1, 2, 4))
    model.compile(loss="mse", metrics=["mae", "mse"])
    x, y_zeta, _ = _unsorted_data(16)
    plain = model.evaluate(x, y_zeta, verbose=0, return_dict=True)
    listed = model.evaluate(x, [y_zeta], verbose=0, return_dict=True)
    assert set(plain) == {"loss", "mae", "mse"}
    for key in plain:
        np.testing.assert_allclose(listed[key], plain[key], rtol=1e-6)


def test_shared_bottom_model_is_a_multi_task_model_over_an_mlp():
    model = SharedBottomModel(5, TASKS, bottom_units=[6, 7], tower_units=[4])
    assert isinstance(model, MultiTaskModel)
    x, labels = _data(16)
    outputs = model.predict(x, verbose=0)
    assert list(outputs) == list(TASKS)
    assert outputs["genre"].shape == (16, 3)
    bottom = model.get_layer("shared_bottom")
    assert [layer.units for layer in bottom.layers] == [6, 7]
    towers = (7 * 4 + 4) * 3
    heads = (4 + 1) * 1 + (4 + 1) * 1 + (4 + 1) * 3
    assert model.count_params() == (5 * 6 + 6) + (6 * 7 + 7) + towers + heads
    model.compile(
        optimizer="adam",
        loss=["binary_crossentropy", "mse", "sparse_categorical_crossentropy"],
    )
    model.fit(x, labels, epochs=1, verbose=0)


def test_shared_bottom_model_config_and_save(tmp_path):
    model = SharedBottomModel(
        5,
        TASKS,
        bottom_units=8,
        tower_units={"click": [3], "price": [], "genre": [4]},
        bottom_activation="tanh",
        name="baseline",
    )
    config = model.get_config()
    assert config["bottom_units"] == [8] and "mixture" not in config
    restored = SharedBottomModel.from_config(config)
    assert restored.get_config() == config
    x, _ = _data(8)
    expected = model.predict(x, verbose=0)
    path = tmp_path / "shared_bottom.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, SharedBottomModel)
    for name, values in loaded.predict(x, verbose=0).items():
        np.testing.assert_allclose(values, expected[name], atol=1e-6)


@pytest.mark.parametrize("bottom_units", [[], [4, 0], 0, True])
def test_shared_bottom_model_invalid_bottom_units(bottom_units):
    with pytest.raises(ValueError, match="`bottom_units`"):
        SharedBottomModel(5, TASKS, bottom_units=bottom_units)
