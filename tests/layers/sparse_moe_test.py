"""SparseMoE behaviour through the public API, on the current backend."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_moe
from keras_moe.layers import SparseMoE

HIDDEN = 8


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _inputs(shape=(2, 6, HIDDEN), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _act(name):
    return {
        "silu": lambda a: a / (1 + np.exp(-a)),
        "relu": lambda a: np.maximum(a, 0),
        "gelu": lambda a: _np(keras.activations.gelu(a)),
    }[name]


def reference_outputs(layer, x, routing):
    """Per-token loop over the routing decisions, in NumPy."""
    x = x.reshape(-1, x.shape[-1])
    idx = _np(routing["expert_indices"]).reshape(len(x), -1)
    w = _np(routing["expert_weights"]).reshape(len(x), -1)
    disp = _np(routing["dispatched"]).reshape(len(x), -1)
    e = layer.experts
    act = _act(layer.experts.get_config()["activation"])
    up, down = _np(e.up_kernel), _np(e.down_kernel)
    gate = _np(e.gate_kernel) if e.gate_kernel is not None else None
    bias = lambda v, i: 0.0 if v is None else _np(v)[i]  # noqa: E731
    out = np.zeros_like(x)
    for t in range(len(x)):
        for j in range(idx.shape[1]):
            if not disp[t, j]:
                continue
            i = idx[t, j]
            h = x[t] @ up[i] + bias(e.up_bias, i)
            if gate is not None:
                h = act(x[t] @ gate[i] + bias(e.gate_bias, i)) * h
            else:
                h = act(h)
            out[t] += w[t, j] * (h @ down[i] + bias(e.down_bias, i))
    if layer.shared_expert is not None:
        s = _np(layer.shared_expert(x))
        if layer.shared_gate is not None:
            s = s / (1 + np.exp(-(x @ _np(layer.shared_gate.kernel))))
        out += s
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(gated=True, activation="silu"),
        dict(use_bias=True, activation="relu"),
        dict(use_bias=True, gated=True, router_bias=True, activation="silu"),
        dict(score_func="sigmoid", num_groups=2, top_groups=1, routed_scaling_factor=2.5),
        dict(normalize_top_k=False, shared_intermediate_dim=6, shared_expert_gate=True),
        dict(capacity_factor=1.0),
        dict(capacity_factor=0.5, group_size=4),
    ],
)
def test_outputs_match_per_token_reference(kwargs):
    layer = SparseMoE(num_experts=4, intermediate_dim=12, top_k=2, **kwargs)
    x = _inputs()
    if kwargs.get("use_bias"):
        layer.build(x.shape)
        for v in (layer.experts.up_bias, layer.experts.gate_bias, layer.experts.down_bias):
            if v is not None:
                v.assign(np.random.default_rng(1).standard_normal(v.shape).astype("float32"))
    y, routing = layer(x, return_routing=True)
    assert tuple(y.shape) == x.shape
    np.testing.assert_allclose(
        _np(y).reshape(-1, HIDDEN), reference_outputs(layer, x, routing), atol=2e-5
    )


def test_routing_dict_shapes_dtypes_and_order():
    layer = SparseMoE(num_experts=6, intermediate_dim=8, top_k=3)
    x = _inputs((3, 5, HIDDEN))
    _, r = layer(x, return_routing=True)
    assert tuple(r["router_logits"].shape) == (3, 5, 6)
    assert keras.backend.standardize_dtype(r["router_logits"].dtype) == "float32"
    assert tuple(r["expert_indices"].shape) == (3, 5, 3)
    assert keras.backend.standardize_dtype(r["expert_indices"].dtype) == "int32"
    assert tuple(r["expert_weights"].shape) == (3, 5, 3)
    assert keras.backend.standardize_dtype(r["dispatched"].dtype) == "bool"
    assert _np(r["dispatched"]).all()  # dropless
    probs = _np(ops.softmax(r["router_logits"], axis=-1))
    chosen = np.take_along_axis(probs, _np(r["expert_indices"]), axis=-1)
    assert (np.diff(chosen, axis=-1) <= 1e-7).all()  # best first
    np.testing.assert_allclose(_np(r["expert_weights"]).sum(-1), 1.0, rtol=1e-5)


def test_weights_formulas():
    x = _inputs((1, 7, HIDDEN))
    raw = SparseMoE(4, 8, top_k=2, normalize_top_k=False)
    _, r = raw(x, return_routing=True)
    probs = _np(ops.softmax(r["router_logits"], -1))
    np.testing.assert_allclose(
        _np(r["expert_weights"]),
        np.take_along_axis(probs, _np(r["expert_indices"]), -1),
        rtol=1e-6,
    )
    scaled = SparseMoE(4, 8, top_k=2, score_func="sigmoid", routed_scaling_factor=2.5)
    _, r = scaled(x, return_routing=True)
    np.testing.assert_allclose(_np(r["expert_weights"]).sum(-1), 2.5, rtol=1e-5)


def test_expert_bias_selects_but_does_not_weight():
    layer = SparseMoE(4, 8, top_k=1, score_func="sigmoid", normalize_top_k=False)
    x = _inputs((1, 5, HIDDEN))
    layer.build(x.shape)
    layer.router.expert_bias.assign(np.array([0.0, 0.0, 10.0, 0.0], "float32"))
    _, r = layer(x, return_routing=True)
    assert (_np(r["expert_indices"]) == 2).all()
    scores = 1 / (1 + np.exp(-_np(r["router_logits"])))
    np.testing.assert_allclose(_np(r["expert_weights"])[..., 0], scores[..., 2], rtol=1e-6)


def test_group_limited_selection_only_uses_top_groups():
    layer = SparseMoE(8, 8, top_k=2, score_func="sigmoid", num_groups=4, top_groups=1)
    x = _inputs((2, 9, HIDDEN))
    _, r = layer(x, return_routing=True)
    idx = _np(r["expert_indices"])
    # Both choices come from the same group of 2 experts...
    assert (idx[..., 0] // 2 == idx[..., 1] // 2).all()
    # ...the group with the best sum of its top-2 scores.
    scores = 1 / (1 + np.exp(-_np(r["router_logits"])))
    group_scores = np.sort(scores.reshape(2, 9, 4, 2), -1)[..., -2:].sum(-1)
    assert (idx[..., 0] // 2 == group_scores.argmax(-1)).all()


def test_capacity_drops_are_counted_and_first_choices_win():
    layer = SparseMoE(2, 8, top_k=2, capacity_factor=0.5)
    x = _inputs((1, 8, HIDDEN))
    _, r = layer(x, return_routing=True)
    disp = _np(r["dispatched"])
    capacity = int(np.ceil(0.5 * 8 * 2 / 2))
    idx = _np(r["expert_indices"])
    for e in range(2):
        assert ((idx == e) & disp).sum() <= capacity
    # With 2 experts and capacity 4 = tokens/2 every first choice fits only if
    # loads are balanced; in any case a second choice is served only when
    # every first choice to that expert was served.
    for e in range(2):
        first = (idx[..., 0] == e)
        if ((idx[..., 1] == e) & disp[..., 1]).any():
            assert disp[..., 0][first].all()
    assert float(_np(layer.dropped_count)) == float((~disp).sum())
    np.testing.assert_allclose(
        _np(layer.expert_counts), [((idx == e) & disp).sum() for e in range(2)]
    )


def test_eval_capacity_factor_applies_when_not_training():
    layer = SparseMoE(4, 8, top_k=1, capacity_factor=0.25, eval_capacity_factor=4.0)
    x = _inputs((1, 16, HIDDEN))
    _, r_train = layer(x, training=True, return_routing=True)
    _, r_eval = layer(x, training=False, return_routing=True)
    assert not _np(r_train["dispatched"]).all()
    assert _np(r_eval["dispatched"]).all()


def test_mask_excludes_tokens():
    layer = SparseMoE(4, 8, top_k=2, capacity_factor=0.5, router_z_loss_weight=1e-3)
    x = _inputs((2, 6, HIDDEN))
    mask = np.ones((2, 6), bool)
    mask[:, :2] = False  # padding first: it would win capacity if it were routed
    y, r = layer(x, mask=mask, return_routing=True)
    y, disp = _np(y), _np(r["dispatched"])
    assert np.all(y[:, :2] == 0)
    assert not disp[:, :2].any()
    assert float(_np(layer.expert_counts).sum()) == float(disp.sum())
    # Masked tokens use no capacity: whatever they hold, real tokens get the
    # same outputs.
    x_other = x.copy()
    x_other[:, :2] = 10 * _inputs((2, 2, HIDDEN), seed=9)
    y_other, r_other = layer(x_other, mask=mask, return_routing=True)
    np.testing.assert_array_equal(_np(r_other["dispatched"]), disp)
    np.testing.assert_allclose(_np(y_other), y, atol=1e-6)


def test_masked_tokens_left_out_of_losses():
    layer = SparseMoE(4, 8, top_k=2, router_z_loss_weight=1e-2)
    x = _inputs((1, 6, HIDDEN))
    x_padded = np.concatenate([x, 100 * _inputs((1, 3, HIDDEN), seed=5)], axis=1)
    mask = np.array([[True] * 6 + [False] * 3])
    layer(x, training=True)
    expected = [float(_np(v)) for v in layer.losses]
    layer(x_padded, mask=mask, training=True)
    np.testing.assert_allclose([float(_np(v)) for v in layer.losses], expected, rtol=1e-5)


def test_keras_mask_propagates_from_embedding():
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(10, HIDDEN, mask_zero=True)(inputs)
    h = SparseMoE(4, 8)(h)
    model = keras.Model(inputs, h)
    tokens = np.array([[1, 2, 3, 0, 0]])
    y = _np(model(tokens))
    assert np.all(y[0, 3:] == 0) and np.any(y[0, :3] != 0)


def test_losses_added_only_in_training():
    layer = SparseMoE(4, 8, router_z_loss_weight=1e-3)
    x = _inputs()
    layer(x)
    assert len(layer.losses) == 0
    layer(x, training=True)
    assert len(layer.losses) == 2
    probs_loss = float(_np(layer.losses[0])) / 1e-2
    assert probs_loss >= 0.99  # E * sum f P >= 1 up to sampling for softmax routers


def test_aux_loss_free_bias_update():
    layer = SparseMoE(4, 8, top_k=1, expert_bias_update_rate=1e-3, score_func="sigmoid")
    x = _inputs((1, 12, HIDDEN))
    _, r = layer(x, training=True, return_routing=True)
    load = np.bincount(_np(r["expert_indices"]).ravel(), minlength=4)
    expected = 1e-3 * np.sign(load.mean() - load)
    np.testing.assert_allclose(_np(layer.router.expert_bias), expected, atol=1e-9)
    layer(x, training=False)
    np.testing.assert_allclose(_np(layer.router.expert_bias), expected, atol=1e-9)


def test_jitter_only_in_training():
    layer = SparseMoE(4, 8, router_jitter=0.5, seed=3)
    x = _inputs()
    _, a = layer(x, return_routing=True)
    _, b = layer(x, return_routing=True)
    np.testing.assert_array_equal(_np(a["router_logits"]), _np(b["router_logits"]))
    _, c = layer(x, training=True, return_routing=True)
    assert not np.allclose(_np(a["router_logits"]), _np(c["router_logits"]))


@pytest.mark.parametrize("shape", [(7, HIDDEN), (2, 3, 4, HIDDEN)])
def test_any_rank(shape):
    layer = SparseMoE(4, 8)
    x = _inputs(shape)
    y, r = layer(x, return_routing=True)
    assert tuple(y.shape) == shape
    assert tuple(r["expert_indices"].shape) == shape[:-1] + (2,)
    assert layer.compute_output_shape(shape) == shape


def test_variables_follow_contract():
    layer = SparseMoE(
        6, 10, gated=True, use_bias=True, router_bias=True,
        shared_intermediate_dim=5, shared_expert_gate=True,
    )
    layer.build((None, HIDDEN))
    shapes = {
        "router.kernel": (HIDDEN, 6),
        "router.bias": (6,),
        "router.expert_bias": (6,),
        "experts.up_kernel": (6, HIDDEN, 10),
        "experts.gate_kernel": (6, HIDDEN, 10),
        "experts.down_kernel": (6, 10, HIDDEN),
        "experts.up_bias": (6, 10),
        "experts.gate_bias": (6, 10),
        "experts.down_bias": (6, HIDDEN),
        "shared_expert.up_kernel": (HIDDEN, 5),
        "shared_expert.gate_kernel": (HIDDEN, 5),
        "shared_expert.down_kernel": (5, HIDDEN),
        "shared_gate.kernel": (HIDDEN, 1),
    }
    for attr, shape in shapes.items():
        owner, name = attr.split(".")
        variable = getattr(getattr(layer, owner), name)
        assert tuple(variable.shape) == shape, attr
        assert variable.path.endswith(attr.replace(".", "/")), variable.path
    assert not layer.router.expert_bias.trainable
    assert np.all(_np(layer.router.expert_bias) == 0)


@pytest.mark.parametrize("initializer", ["glorot_uniform", "seeded"])
def test_experts_start_different(initializer):
    if initializer == "seeded":
        initializer = keras.initializers.GlorotUniform(seed=1)
    layer = SparseMoE(4, 8, gated=True, kernel_initializer=initializer)
    layer.build((None, HIDDEN))
    up = _np(layer.experts.up_kernel)
    assert not np.allclose(up[0], up[1])
    assert not np.allclose(up, _np(layer.experts.gate_kernel))
    # Per-expert fan: the scale matches a (hidden, width) glorot kernel.
    limit = np.sqrt(6 / (HIDDEN + 8))
    assert np.abs(up).max() <= limit and np.abs(up).max() > 0.5 * limit


def test_wrong_hidden_size_and_rank_raise():
    layer = SparseMoE(4, 8)
    layer(_inputs())
    with pytest.raises(ValueError, match="axis -1"):
        layer(_inputs((2, 6, HIDDEN + 1)))
    with pytest.raises(ValueError, match="rank >= 2"):
        SparseMoE(4, 8).build((HIDDEN,))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=2.5), "num_experts"),
        (dict(intermediate_dim=0), "intermediate_dim"),
        (dict(intermediate_dim=-3), "intermediate_dim"),
        (dict(top_k=5), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(score_func="relu"), "score_func"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(num_groups=3), "num_groups"),
        (dict(num_groups=0), "num_groups"),
        (dict(num_groups=2, top_groups=3), "top_groups"),
        (dict(num_groups=4, top_groups=1, top_k=2), "top_k"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(eval_capacity_factor=0), "eval_capacity_factor"),
        (dict(group_size=0), "group_size"),
        (dict(shared_intermediate_dim=-1), "shared_intermediate_dim"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
        (dict(router_jitter=1.0), "router_jitter"),
        (dict(router_jitter=-0.1), "router_jitter"),
        (dict(router_dtype="int32"), "router_dtype"),
        (dict(load_balance_loss_weight=-1.0), "load_balance_loss_weight"),
        (dict(router_z_loss_weight=-1.0), "router_z_loss_weight"),
        (dict(expert_bias_update_rate=-1e-3), "expert_bias_update_rate"),
        (dict(expert_dropout=1.0), "expert_dropout"),
    ],
)
def test_invalid_arguments_raise(kwargs, name):
    args = dict(num_experts=4, intermediate_dim=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        SparseMoE(**args)


def test_sequential_functional_subclassed_and_summary():
    seq = keras.Sequential([keras.Input((5, HIDDEN))])
    seq.add(SparseMoE(4, 8))
    seq.add(keras.layers.Dense(1))
    seq.summary(print_fn=lambda *a, **k: None)
    assert tuple(seq(_inputs((2, 5, HIDDEN))).shape) == (2, 5, 1)

    inputs = keras.Input((5, HIDDEN))
    out, routing = SparseMoE(4, 8)(inputs, return_routing=True)
    func = keras.Model(inputs, [out, routing])
    y, r = func(_inputs((2, 5, HIDDEN)))
    assert tuple(r["expert_indices"].shape) == (2, 5, 2)
    assert _np(r["dispatched"]).all()

    class Block(keras.Model):
        def __init__(self):
            super().__init__()
            self.moe = SparseMoE(4, 8)
            self.norm = keras.layers.LayerNormalization()

        def call(self, x, training=None):
            return x + self.moe(self.norm(x), training=training)

    block = Block()
    assert tuple(block(_inputs()).shape) == (2, 6, HIDDEN)


def test_fit_includes_aux_losses_and_learns():
    model = keras.Sequential(
        [keras.Input((4, HIDDEN)), SparseMoE(4, 16, router_z_loss_weight=1e-3), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = _inputs((64, 4, HIDDEN))
    y = np.sin(x.sum(-1, keepdims=True))
    first = model.evaluate(x, y, verbose=0)
    history = model.fit(x, y, epochs=8, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < first
    # The aux losses are part of what fit() minimizes.
    model(x[:16], training=True)
    assert len(model.losses) == 2


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_fit_with_partial_batches(capacity_factor):
    """A last partial batch makes TensorFlow retrace with an unknown batch size."""
    model = keras.Sequential(
        [
            keras.Input((3, HIDDEN)),
            SparseMoE(4, 8, capacity_factor=capacity_factor, group_size=capacity_factor and 4),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    x = _inputs((21, 3, HIDDEN))
    model.fit(x, x, epochs=2, batch_size=8, verbose=0)
    assert model.predict(x, batch_size=8, verbose=0).shape == x.shape


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_router_stays_float32(policy):
    keras.config.set_dtype_policy(policy)
    layer = SparseMoE(4, 8, capacity_factor=1.5)
    x = _inputs()
    y, r = layer(x, return_routing=True)
    compute = keras.mixed_precision.Policy(policy).compute_dtype
    assert keras.backend.standardize_dtype(y.dtype) == compute
    assert keras.backend.standardize_dtype(r["router_logits"].dtype) == "float32"
    assert keras.backend.standardize_dtype(layer.router.kernel.dtype) == "float32"
    assert layer.router.compute_dtype == "float32"
    assert keras.backend.standardize_dtype(layer.experts.up_kernel.dtype) == "float32"
    assert np.isfinite(_np(ops.cast(y, "float32"))).all()


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_dropless_fit_with_bias_and_expert_dropout(policy):
    """Dropless training through `fit` (a TF graph: the fused per-expert FFN) with every option
    the expert FFN has: biases, the dropout mask, a gated activation, mixed precision."""
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((5, HIDDEN)),
            SparseMoE(5, 8, top_k=2, gated=True, activation="silu", use_bias=True, expert_dropout=0.2),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    x = _inputs((12, 5, HIDDEN))
    before = [np.array(_np(ops.cast(v, "float32"))) for v in model.trainable_weights]
    history = model.fit(x, x, epochs=2, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after = [np.array(_np(ops.cast(v, "float32"))) for v in model.trainable_weights]
    # Every expert weight (kernels and biases) was trained.
    assert all(np.any(a != b) for a, b in zip(after, before))
    y = model.predict(x, batch_size=4, verbose=0)
    assert y.shape == x.shape and np.isfinite(np.asarray(y, "float32")).all()


def test_get_config_round_trip():
    layer = SparseMoE(
        8, 16, top_k=3, activation="silu", gated=True, use_bias=True, score_func="sigmoid",
        normalize_top_k=False, routed_scaling_factor=2.0, num_groups=4, top_groups=2,
        capacity_factor=1.5, eval_capacity_factor=2.0, group_size=8,
        shared_intermediate_dim=4, shared_expert_gate=True, router_bias=True,
        router_jitter=0.1, load_balance_loss_weight=0.1, router_z_loss_weight=0.01,
        expert_bias_update_rate=1e-3, expert_dropout=0.1, seed=7, name="moe",
    )
    config = layer.get_config()
    clone = SparseMoE.from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["module"] == "keras_moe.layers.sparse_moe" or "keras_moe" in str(serialized)
    again = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(again, SparseMoE)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_save_and_load_reproduces_outputs(tmp_path, capacity_factor):
    model = keras.Sequential(
        [
            keras.Input((6, HIDDEN)),
            SparseMoE(
                4, 8, gated=True, activation="silu", capacity_factor=capacity_factor,
                shared_intermediate_dim=4, shared_expert_gate=True, router_bias=True,
            ),
        ]
    )
    x = _inputs()
    model.layers[0].router.expert_bias.assign(np.array([0.1, -0.1, 0.0, 0.2], "float32"))
    expected = _np(model(x))
    path = str(tmp_path / "moe.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(_np(loaded(x)), expected)
    assert isinstance(loaded.layers[0], keras_moe.layers.SparseMoE)
