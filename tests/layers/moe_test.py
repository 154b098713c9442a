"""The MoE layer core with any router, and the edges every routed layer shares."""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_moe
from keras_moe.experts import StackedExperts
from keras_moe.layers import MoE
from keras_moe.layers import SparseMoE
from keras_moe.routers import Router
from keras_moe.routers import RoutingPlan
from keras_moe.routers import TopKRouter
from tests.layers.sparse_moe_test import reference_outputs

HIDDEN = 4


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _inputs(shape=(2, 6, HIDDEN), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


@keras.saving.register_keras_serializable(package="keras_moe_tests")
class HashRouter(Router):
    """Token `t` of each group goes to expert `t % E` with weight 1 (Roller et al.)."""

    @property
    def num_selected(self):
        return 1

    def compute_routing(self, inputs, logits, routed, training):
        groups, tokens = ops.shape(logits)[0], ops.shape(logits)[1]
        experts = ops.arange(tokens, dtype="int32") % self.num_experts
        indices = ops.broadcast_to(ops.reshape(experts, (1, tokens, 1)), (groups, tokens, 1))
        return RoutingPlan(
            expert_indices=indices,
            expert_weights=ops.ones((groups, tokens, 1), "float32"),
            dispatch_mask=ops.expand_dims(routed, -1),
            router_logits=logits,
            router_probs=ops.softmax(logits, axis=-1),
        )


def _hash_moe(**kwargs):
    return MoE(HashRouter(3), StackedExperts(3, 5, gated=True), **kwargs)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_custom_router_drives_the_layer(capacity_factor):
    layer = _hash_moe(capacity_factor=capacity_factor)
    x = _inputs((1, 7, HIDDEN))
    y, routing = layer(x, return_routing=True)
    np.testing.assert_array_equal(_np(routing["expert_indices"])[0, :, 0], np.arange(7) % 3)
    np.testing.assert_allclose(_np(y).reshape(-1, HIDDEN), reference_outputs(layer, x, routing), atol=1e-5)
    assert _np(layer.expert_counts).sum() == _np(routing["dispatched"]).sum()


def test_moe_config_and_save_round_trip(tmp_path):
    layer = MoE(
        TopKRouter(4, top_k=2, z_loss_weight=1e-3),
        StackedExperts(4, 6),
        capacity_factor=1.5,
        group_size=4,
        name="core",
    )
    model = keras.Sequential([keras.Input((6, HIDDEN)), layer])
    x = _inputs()
    expected = _np(model(x))
    clone = MoE.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    path = str(tmp_path / "core.keras")
    model.save(path)
    np.testing.assert_array_equal(_np(keras.models.load_model(path)(x)), expected)


def test_moe_rejects_bad_parts():
    with pytest.raises(ValueError, match="router"):
        MoE(object(), StackedExperts(4, 6))
    with pytest.raises(ValueError, match="num_experts"):
        MoE(TopKRouter(4), StackedExperts(3, 6))
    with pytest.raises(ValueError, match="shared_gate"):
        MoE(TopKRouter(4), StackedExperts(4, 6), shared_gate=keras.layers.Dense(1))


def test_router_plan_fields_and_legacy_dict_access():
    router = TopKRouter(5, top_k=2, batch_prioritized_routing=True)
    plan = router(_inputs((2, 3, HIDDEN)), token_mask=np.array([[1, 1, 0], [1, 1, 1]], bool))
    assert tuple(plan.expert_indices.shape) == (2, 3, 2)
    assert tuple(plan.priority.shape) == (2, 3)
    np.testing.assert_array_equal(_np(plan.dispatch_mask)[0, 2], [False, False])
    np.testing.assert_array_equal(_np(plan["expert_weights"]), _np(plan.expert_weights))


def test_loss_weights_are_variables_read_by_the_step():
    layer = SparseMoE(4, 6, router_z_loss_weight=1e-3)
    x = _inputs()
    layer(x, training=True)
    before = [float(_np(v)) for v in layer.losses]
    layer.router.loss_weights["z"].assign(2e-3)
    layer(x, training=True)
    after = [float(_np(v)) for v in layer.losses]
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6)
    np.testing.assert_allclose(after[1], 2 * before[1], rtol=1e-5)
    # A loss whose weight was 0 at construction is not added at all.
    plain = SparseMoE(4, 6)
    plain(x, training=True)
    assert len(plain.losses) == 1


class CallOverridingRouter(TopKRouter):
    """A router subclass whose `call` predates `defer_losses` (scales its input)."""

    def call(self, inputs, token_mask=None, training=None):
        return super().call(inputs * 1.0, token_mask=token_mask, training=training)


def test_router_losses_are_added_after_the_experts_and_equal_eager_ones():
    x = _inputs()
    layer = SparseMoE(4, 6, router_z_loss_weight=1e-3, seed=1)
    layer(x, training=True)
    deferred = [float(_np(v)) for v in layer.losses]
    assert layer._defer_router_losses and len(deferred) == 2
    # The same router adding its losses itself (not deferred): same values.
    router = layer.router
    router._clear_losses()
    groups = ops.expand_dims(ops.reshape(ops.convert_to_tensor(x), (-1, HIDDEN)), 0)
    router(groups, training=True)
    np.testing.assert_allclose([float(_np(v)) for v in router.losses], deferred, rtol=1e-6)
    # A router whose `call` has no `defer_losses` still has its losses added.
    old_style = MoE(
        CallOverridingRouter(4, top_k=2, z_loss_weight=1e-3),
        StackedExperts(4, 6),
    )
    assert not old_style._defer_router_losses
    old_style(x, training=True)
    assert len(old_style.losses) == 2
    # ... and its training statistics recorded, as with the built-in routers.
    assert float(_np(old_style.training_steps)) == 1.0
    assert float(_np(layer.training_steps)) == 1.0
    # Inference adds none.
    layer(x, training=False)
    assert layer.losses == []


def test_lazy_losses_compute_once_when_read():
    from keras_moe.routers import LazyLosses

    calls = []

    def loss():
        calls.append(1)
        return ops.convert_to_tensor(2.0)

    losses = LazyLosses({"z": loss, "load_balance": ops.convert_to_tensor(1.0)})
    assert sorted(losses) == ["load_balance", "z"] and len(losses) == 2 and calls == []
    assert float(_np(losses["z"])) == 2.0 and float(_np(losses["z"])) == 2.0
    assert len(calls) == 1
    more = losses.with_losses({"extra": lambda: ops.convert_to_tensor(3.0)})
    assert sorted(more) == ["extra", "load_balance", "z"] and len(calls) == 1
    assert float(_np(more["z"])) == 2.0 and len(calls) == 1  # read through, not recomputed
    # add_aux_losses reads only the losses of non-zero weight.
    router = TopKRouter(4, top_k=2)  # z weight 0
    router.build((1, 3, HIDDEN))
    calls.clear()
    plan = router(_inputs((1, 3, HIDDEN)), training=True, defer_losses=True)
    assert router.losses == []
    plan = plan._replace(aux_losses=LazyLosses({"load_balance": lambda: ops.convert_to_tensor(1.0), "z": loss}))
    router.add_aux_losses(plan)
    assert len(router.losses) == 1 and calls == []


def test_router_argument_errors_use_each_callers_names():
    with pytest.raises(ValueError, match="`router_jitter`"):
        SparseMoE(4, 8, router_jitter=2.0)
    with pytest.raises(ValueError, match="`jitter`"):
        TopKRouter(4, jitter=2.0)
    with pytest.raises(ValueError, match="`router_z_loss_weight`"):
        SparseMoE(4, 8, router_z_loss_weight=-1.0)
    with pytest.raises(ValueError, match="`expert_dropout`"):
        SparseMoE(4, 8, expert_dropout=1.5)


def test_numpy_integers_are_accepted_everywhere():
    layer = SparseMoE(np.int64(4), np.int32(6), top_k=np.int64(2), group_size=np.int64(4),
                      capacity_factor=1.0)
    assert layer(_inputs()).shape == (2, 6, HIDDEN)
    assert isinstance(layer.get_config()["top_k"], int)


# Batch-prioritized routing --------------------------------------------------


def test_capacity_priority_serves_most_confident_first():
    indices = np.zeros((1, 5, 1), "int32")  # every token wants expert 0
    valid = np.ones((1, 5, 1), bool)
    priority = np.array([[0.1, 0.9, 0.3, 0.8, 0.2]], "float32")
    _, dispatched = keras_moe.dispatch.capacity_slots(indices, valid, 2, 2, priority=priority)
    np.testing.assert_array_equal(_np(dispatched)[0, :, 0], [False, True, False, True, False])
    _, dispatched = keras_moe.dispatch.capacity_slots(indices, valid, 2, 2)
    np.testing.assert_array_equal(_np(dispatched)[0, :, 0], [True, True, False, False, False])


def test_batch_prioritized_routing_keeps_the_most_confident_tokens():
    layer = SparseMoE(2, 6, top_k=1, capacity_factor=0.5, batch_prioritized_routing=True)
    x = _inputs((1, 12, HIDDEN), seed=3)
    y, r = layer(x, return_routing=True)
    probs = _np(ops.softmax(r["router_logits"], axis=-1))[0]
    idx, disp = _np(r["expert_indices"])[0, :, 0], _np(r["dispatched"])[0, :, 0]
    capacity = 3
    for e in range(2):
        mine = np.where(idx == e)[0]
        kept = mine[np.argsort(-probs[mine, e], kind="stable")[:capacity]]
        np.testing.assert_array_equal(np.sort(np.where(disp & (idx == e))[0]), np.sort(kept))
    np.testing.assert_allclose(_np(y).reshape(-1, HIDDEN), reference_outputs(layer, x, r), atol=1e-5)
    config = layer.get_config()
    assert config["batch_prioritized_routing"] is True
    assert SparseMoE.from_config(config).get_config() == config


# The edges (issue 6) ----------------------------------------------------------


@pytest.mark.parametrize("capacity_factor, group_size", [(None, None), (1.0, None), (1.0, 4)])
def test_zero_length_batch_returns_empty_output(capacity_factor, group_size):
    layer = SparseMoE(4, 6, capacity_factor=capacity_factor, group_size=group_size)
    layer(_inputs())
    x = np.zeros((0, 6, HIDDEN), "float32")
    y, routing = layer(x, return_routing=True)
    assert tuple(y.shape) == (0, 6, HIDDEN)
    assert tuple(routing["expert_indices"].shape) == (0, 6, 2)
    assert tuple(layer(np.zeros((2, 0, HIDDEN), "float32")).shape) == (2, 0, HIDDEN)


def test_mask_of_the_wrong_shape_names_both_shapes():
    layer = SparseMoE(4, 6)
    with pytest.raises(ValueError, match=r"\(2, 6\).*\(2, 5\)"):
        layer(_inputs(), mask=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="mask"):
        layer(_inputs(), mask=np.ones((2, 6, 1), bool))


def test_integer_inputs_are_cast_like_keras_layers():
    layer = SparseMoE(4, 6, capacity_factor=1.0)
    ints = np.arange(2 * 6 * HIDDEN).reshape(2, 6, HIDDEN) % 5 - 2
    y = layer(ints.astype("int32"))
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    np.testing.assert_allclose(_np(y), _np(layer(ints.astype("float32"))), atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_non_finite_tokens_take_no_capacity_from_others(bad, capacity_factor):
    layer = SparseMoE(2, 6, top_k=1, capacity_factor=capacity_factor)
    x = _inputs((1, 8, HIDDEN), seed=5)
    x_bad = x.copy()
    x_bad[0, 0] = bad
    mask = np.ones((1, 8), bool)
    mask[0, 0] = False
    y_bad, r_bad = layer(x_bad, return_routing=True)
    assert float(_np(layer.nonfinite_count)) == 1.0
    y_masked, r_masked = layer(x, mask=mask, return_routing=True)
    assert np.isnan(_np(y_bad)[0, 0]).all()
    # The other tokens are served exactly as if the bad token were padding.
    np.testing.assert_allclose(_np(y_bad)[0, 1:], _np(y_masked)[0, 1:], atol=1e-6)
    np.testing.assert_array_equal(_np(r_bad["dispatched"])[0, 1:], _np(r_masked["dispatched"])[0, 1:])
    assert not _np(r_bad["dispatched"])[0, 0].any()


def test_group_size_without_a_capacity_factor_is_refused():
    with pytest.raises(ValueError, match="group_size.*capacity_factor"):
        SparseMoE(4, 6, group_size=8)
    SparseMoE(4, 6, group_size=8, eval_capacity_factor=2.0)  # used in evaluation


@pytest.mark.parametrize("capacity_factor", [None, 1.5])
def test_one_expert_does_not_warn(capacity_factor):
    layer = SparseMoE(1, 6, top_k=1, capacity_factor=capacity_factor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(_inputs(), training=True)
        layer(_inputs())


def test_files_written_before_the_added_state_still_load():
    """Routers and layers load weight files without the variables added since."""
    layer = SparseMoE(4, 6, router_bias=True)
    layer.build((None, HIDDEN))
    store = {str(i): _np(v) for i, v in enumerate(
        layer.router._trainable_variables
        + [v for v in layer.router._non_trainable_variables if v.name == "expert_bias"]
    )}
    store["2"] = np.arange(4, dtype="float32")
    layer.router.load_own_variables(store)
    np.testing.assert_array_equal(_np(layer.router.expert_bias), np.arange(4))
    with pytest.raises(ValueError, match="expected"):
        layer.router.load_own_variables({"0": store["0"]})
