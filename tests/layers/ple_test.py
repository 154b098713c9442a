import numpy as np
import pytest
import keras
from keras import ops

from keras_moe.layers import CGC
from keras_moe.layers import PLE


def _x(batch=4, features=6):
    return np.random.default_rng(0).normal(size=(batch, features)).astype(
        "float32"
    )


def _np(x):
    return ops.convert_to_numpy(x)


def _weights(layer):
    return {w.path.split("/", 1)[1]: _np(w) for w in layer.weights}


def _softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_cgc_shapes_and_gates():
    layer = CGC(3, 2, 1, [5, 4], gate_units=[3], gate_initializer="he_normal")
    outputs, gates = layer(_x(), return_gates=True)
    assert [tuple(o.shape) for o in outputs] == [(4, 4)] * 3
    assert [tuple(g.shape) for g in gates] == [(4, 3)] * 3
    for gate in gates:
        np.testing.assert_allclose(_np(gate).sum(-1), 1.0, atol=1e-6)
    shapes = {name: v.shape for name, v in _weights(layer).items()}
    assert shapes["experts/kernel_0"] == (7, 6, 5)  # 3 tasks * 2 + 1 shared
    assert shapes["task_gates/kernel_1"] == (3, 3, 3)
    assert "shared_gate/kernel_0" not in shapes


def test_cgc_shared_output():
    layer = CGC(2, 2, 3, 4, shared_output=True)
    outputs, gates = layer(_x(), return_gates=True)
    assert [tuple(o.shape) for o in outputs] == [(4, 4)] * 3
    assert [tuple(g.shape) for g in gates] == [(4, 5), (4, 5), (4, 7)]
    # Gates start as uniform mixtures (gate_initializer="zeros").
    np.testing.assert_allclose(_np(gates[0]), 1 / 5, atol=1e-6)
    np.testing.assert_allclose(_np(gates[-1]), 1 / 7, atol=1e-6)


def test_cgc_task_gates_mix_own_and_shared_experts_only():
    x = _x()
    layer = CGC(2, 2, 1, 3, shared_output=True, gate_initializer="random_normal")
    outputs, gates = layer(x, return_gates=True)
    w = _weights(layer)
    experts = np.maximum(
        np.einsum("bi,eio->beo", x, w["experts/kernel_0"])
        + w["experts/bias_0"],
        0.0,
    )  # experts 0-1: task 0, 2-3: task 1, 4: shared
    task_gates = _softmax(
        np.einsum("bi,tio->bto", x, w["task_gates/kernel_0"])
        + w["task_gates/bias_0"]
    )
    visible = {0: [0, 1, 4], 1: [2, 3, 4]}
    for t in range(2):
        np.testing.assert_allclose(
            _np(gates[t]), task_gates[:, t], rtol=1e-5, atol=1e-6
        )
        expected = np.einsum(
            "be,beo->bo", task_gates[:, t], experts[:, visible[t]]
        )
        np.testing.assert_allclose(
            _np(outputs[t]), expected, rtol=1e-5, atol=1e-5
        )
    shared_gate = _softmax(
        x @ w["shared_gate/kernel_0"][0] + w["shared_gate/bias_0"][0]
    )
    np.testing.assert_allclose(
        _np(outputs[2]),
        np.einsum("be,beo->bo", shared_gate, experts),
        rtol=1e-5,
        atol=1e-5,
    )


def test_cgc_list_inputs_route_streams_to_their_experts():
    rng = np.random.default_rng(2)
    streams = [rng.normal(size=(4, 3)).astype("float32") for _ in range(3)]
    layer = CGC(2, 1, 1, 2, shared_output=True, gate_initializer="he_normal")
    outputs = layer(streams)
    assert [tuple(o.shape) for o in outputs] == [(4, 2)] * 3
    # Task 0's output must not depend on task 1's stream.
    changed = list(streams)
    changed[1] = changed[1] + 1.0
    np.testing.assert_allclose(
        _np(layer(changed)[0]), _np(outputs[0]), atol=1e-6
    )
    assert not np.allclose(_np(layer(changed)[1]), _np(outputs[1]))


def test_cgc_list_input_of_wrong_length():
    layer = CGC(2, 1, 1, 2)
    with pytest.raises(ValueError, match="num_tasks"):
        layer([_x(), _x()])


def test_ple_shapes_and_gates_per_level():
    layer = PLE(2, 3, 2, 1, [5, 4], gate_units=[3])
    outputs, gates = layer(_x(), return_gates=True)
    assert [tuple(o.shape) for o in outputs] == [(4, 4)] * 2
    assert len(gates) == 3
    assert [tuple(g.shape) for g in gates[0]] == [(4, 3), (4, 3), (4, 5)]
    assert [tuple(g.shape) for g in gates[1]] == [(4, 3), (4, 3), (4, 5)]
    assert [tuple(g.shape) for g in gates[2]] == [(4, 3), (4, 3)]
    for level in gates:
        for gate in level:
            np.testing.assert_allclose(_np(gate).sum(-1), 1.0, atol=1e-6)
    shapes = {name: v.shape for name, v in _weights(layer).items()}
    assert shapes["level_0/experts/kernel_0"] == (5, 6, 5)
    assert shapes["level_1/experts/kernel_0"] == (5, 4, 5)
    assert "level_1/shared_gate/kernel_0" in shapes
    assert "level_2/shared_gate/kernel_0" not in shapes


def test_single_level_ple_is_cgc():
    x = _x()
    ple = PLE(2, 1, 2, 2, 3)
    cgc = CGC(2, 2, 2, 3)
    ple.build(x.shape)
    cgc.build(x.shape)
    cgc.set_weights(ple.get_weights())
    for a, b in zip(ple(x), cgc(x)):
        np.testing.assert_allclose(_np(a), _np(b), atol=1e-6)


def test_single_task():
    outputs, gates = PLE(1, 2, 1, 1, 3)(_x(), return_gates=True)
    assert len(outputs) == 1 and tuple(outputs[0].shape) == (4, 3)
    assert [len(level) for level in gates] == [2, 1]


@pytest.mark.parametrize("num_task_experts, num_shared_experts", [(0, 3), (2, 0)])
def test_only_task_or_only_shared_experts(num_task_experts, num_shared_experts):
    outputs = PLE(2, 2, num_task_experts, num_shared_experts, 3)(_x())
    assert [tuple(o.shape) for o in outputs] == [(4, 3)] * 2


def test_experts_start_independent_across_experts_and_levels():
    layer = PLE(2, 2, 2, 2, [16, 16])
    layer.build((None, 16))
    w = _weights(layer)
    kernel = w["level_0/experts/kernel_0"]
    for i in range(kernel.shape[0]):
        for j in range(i + 1, kernel.shape[0]):
            assert not np.allclose(kernel[i], kernel[j])
    # Equally shaped kernels of two levels must not start equal either.
    assert not np.allclose(
        w["level_0/experts/kernel_1"], w["level_1/experts/kernel_1"]
    )
    limit = np.sqrt(6.0 / 32)
    np.testing.assert_allclose(
        kernel.std(axis=(1, 2)), limit / np.sqrt(3.0), rtol=0.2
    )


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(num_tasks=0), "num_tasks"),
        (dict(num_levels=0), "num_levels"),
        (dict(num_task_experts=-1), "num_task_experts"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(num_task_experts=0, num_shared_experts=0), "num_task_experts"),
        (dict(expert_units=[]), "expert_units"),
        (dict(expert_units=[3, 0]), "expert_units"),
        (dict(gate_units=[-2]), "gate_units"),
        (dict(dropout=-0.1), "dropout"),
    ],
)
def test_ple_invalid_arguments(kwargs, argument):
    args = dict(
        num_tasks=2,
        num_levels=2,
        num_task_experts=1,
        num_shared_experts=1,
        expert_units=4,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        PLE(**args)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(num_tasks=0), "num_tasks"),
        (dict(num_task_experts=0, num_shared_experts=0), "num_shared_experts"),
        (dict(expert_units=-4), "expert_units"),
    ],
)
def test_cgc_invalid_arguments(kwargs, argument):
    args = dict(
        num_tasks=2, num_task_experts=1, num_shared_experts=1, expert_units=4
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        CGC(**args)


@pytest.mark.parametrize("cls", [CGC, PLE])
def test_get_config_round_trip(cls):
    kwargs = dict(
        num_tasks=2,
        num_task_experts=1,
        num_shared_experts=2,
        expert_units=[5, 3],
        gate_units=[4],
        expert_activation="gelu",
        gate_initializer="glorot_normal",
        dropout=0.1,
    )
    if cls is PLE:
        kwargs["num_levels"] = 2
    else:
        kwargs["shared_output"] = True
    layer = cls(**kwargs)
    config = layer.get_config()
    restored = cls.from_config(config)
    assert restored.get_config() == config
    x = _x()
    layer.build(x.shape)
    restored.build(x.shape)
    restored.set_weights(layer.get_weights())
    for a, b in zip(layer(x), restored(x)):
        np.testing.assert_allclose(_np(a), _np(b), atol=1e-6)


def test_functional_model_save_and_load(tmp_path):
    inputs = keras.Input(shape=(6,))
    ple_outputs, gates = PLE(2, 2, 1, 1, [5, 4])(inputs, return_gates=True)
    assert [tuple(o.shape) for o in ple_outputs] == [(None, 4)] * 2
    assert [[tuple(g.shape) for g in level] for level in gates] == [
        [(None, 2), (None, 2), (None, 3)],
        [(None, 2), (None, 2)],
    ]
    # A standalone CGC fed the list of streams of a lower CGC.
    streams = CGC(2, 1, 1, 4, shared_output=True, name="lower")(inputs)
    cgc_outputs = CGC(2, 1, 2, 3, name="upper")(streams)
    model = keras.Model(inputs, ple_outputs + cgc_outputs + gates[-1])
    x = _x()
    expected = model.predict(x, verbose=0)
    path = tmp_path / "ple.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    for a, b in zip(expected, restored.predict(x, verbose=0)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_compute_output_shape():
    assert PLE(3, 2, 1, 1, [8, 5]).compute_output_shape((None, 7)) == [
        (None, 5)
    ] * 3
    cgc = CGC(2, 1, 1, 4, shared_output=True)
    assert cgc.compute_output_shape((None, 7)) == [(None, 4)] * 3
    assert cgc.compute_output_shape([(None, 4)] * 3) == [(None, 4)] * 3



def test_ple_expert_widths_per_level():
    layer = PLE(2, 2, 1, 1, [[6, 5], [3]])
    outputs, gates = layer(_x(), return_gates=True)
    assert [tuple(o.shape) for o in outputs] == [(4, 3)] * 2
    shapes = {name: v.shape for name, v in _weights(layer).items()}
    assert shapes["level_0/experts/kernel_0"] == (3, 6, 6)
    assert shapes["level_0/experts/kernel_1"] == (3, 6, 5)
    assert shapes["level_1/experts/kernel_0"] == (3, 5, 3)
    assert "level_1/experts/kernel_1" not in shapes
    assert layer.compute_output_shape((None, 6)) == [(None, 3)] * 2
    config = layer.get_config()
    assert config["expert_units"] == [[6, 5], [3]]
    assert PLE.from_config(config).get_config() == config
    # An int entry beside a list is that level's single width.
    assert PLE(2, 2, 1, 1, [[6, 5], 3]).level_expert_units == ((6, 5), (3,))


def test_ple_equal_levels_keep_their_config_form():
    layer = PLE(2, 3, 1, 1, [5, 4])
    assert layer.get_config()["expert_units"] == [5, 4]
    assert layer.level_expert_units == ((5, 4),) * 3
    assert PLE(2, 2, 1, 1, 7).get_config()["expert_units"] == [7]


@pytest.mark.parametrize(
    "expert_units, message",
    [
        ([[4], [4], [4]], "one entry per stage \\(2\\)"),
        ([[4]], "one entry per stage \\(2\\)"),
        ([[4], []], "`expert_units\\[1\\]`"),
        ([[4, 0], [4]], "`expert_units\\[0\\]`"),
        ([[4], True], "`expert_units\\[1\\]`"),
    ],
)
def test_ple_invalid_expert_widths_per_level(expert_units, message):
    with pytest.raises(ValueError, match=message):
        PLE(2, 2, 1, 1, expert_units)


@pytest.mark.parametrize(
    "kwargs, argument",
    [(dict(shared_output="yes"), "shared_output"), (dict(use_bias=1), "use_bias")],
)
def test_cgc_invalid_flags(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        CGC(2, 1, 1, 4, **kwargs)
