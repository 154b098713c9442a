"""GShard's second-expert policies for top-2 routing."""

import keras
import numpy as np
import pytest

from keras_moe.layers import SparseMoE
from keras_moe.routers import TopKRouter
from tests.layers.sparse_moe_test import reference_outputs

HIDDEN = 6


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _inputs(shape=(2, 9, HIDDEN), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _router(num_experts=5, kernel_seed=0, **kwargs):
    router = TopKRouter(num_experts, top_k=2, **kwargs)
    router.build((None, None, HIDDEN))
    rng = np.random.default_rng(kernel_seed)
    router.kernel.assign(rng.standard_normal((HIDDEN, num_experts)).astype("float32"))
    return router


def test_random_policy_keeps_second_experts_above_the_threshold():
    router = _router(second_expert_policy="random", seed=1)
    x = _inputs((4, 50, HIDDEN))
    mask = np.ones((4, 50), bool)
    mask[0, :10] = False
    plan = router(x, token_mask=mask, training=True)
    w, dispatch = _np(plan.expert_weights), _np(plan.dispatch_mask)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)  # renormalized before the policy
    np.testing.assert_array_equal(dispatch[..., 0], mask)
    assert dispatch[..., 1][mask & (w[..., 1] >= 0.2)].all()
    assert not dispatch[~mask].any()
    low = mask & (w[..., 1] < 0.2)
    assert 0 < dispatch[..., 1][low].sum() < low.sum()  # some dropped, some kept
    # The keep rate follows min(1, w2 / 0.2) (loosely: a random draw).
    expected = np.minimum(1, w[..., 1][mask] / 0.2).mean()
    assert abs(dispatch[..., 1][mask].mean() - expected) < 0.1


def test_sampling_draws_the_second_expert_from_the_other_scores():
    router = _router(num_experts=4, second_expert_policy="sampling", seed=2)
    x = np.repeat(_inputs((1, 1, HIDDEN), seed=3), 4000, axis=1)  # one token, many draws
    plan = router(x, training=True)
    probs = _np(plan.router_probs)[0, 0]
    idx = _np(plan.expert_indices)[0]
    first = int(np.argmax(probs))
    assert (idx[:, 0] == first).all() and (idx[:, 1] != first).all()
    others = np.delete(np.arange(4), first)
    expected = probs[others] / probs[others].sum()
    observed = np.array([(idx[:, 1] == e).mean() for e in others])
    np.testing.assert_allclose(observed, expected, atol=0.03)
    w = _np(plan.expert_weights)[0]
    np.testing.assert_allclose(
        w[:, 1], probs[idx[:, 1]] / (probs[first] + probs[idx[:, 1]]), rtol=1e-5
    )
    assert _np(plan.dispatch_mask).all()


def test_same_seed_same_routing_and_the_eval_policy():
    x = _inputs()
    for policy in ("random", "sampling"):
        a, b = (_router(second_expert_policy=policy, seed=7) for _ in range(2))
        for _ in range(2):
            pa, pb = a(x, training=True), b(x, training=True)
            np.testing.assert_array_equal(_np(pa.expert_indices), _np(pb.expert_indices))
            np.testing.assert_array_equal(_np(pa.dispatch_mask), _np(pb.dispatch_mask))
    # The policy applies in inference too, unless an eval policy says otherwise.
    router = _router(second_expert_policy="random", second_expert_threshold=10.0, seed=1)
    assert not _np(router(x).dispatch_mask)[..., 1].all()
    router = _router(second_expert_policy="random", second_expert_threshold=10.0,
                     eval_second_expert_policy="all", seed=1)
    assert _np(router(x).dispatch_mask).all()
    assert not _np(router(x, training=True).dispatch_mask)[..., 1].all()


def test_dropped_second_experts_are_not_capacity_drops():
    layer = SparseMoE(4, 8, top_k=2, capacity_factor=4.0, second_expert_policy="random",
                      second_expert_threshold=10.0, seed=3)
    x = _inputs((1, 12, HIDDEN))
    y, r = layer(x, training=True, return_routing=True)
    disp = _np(r["dispatched"])
    assert disp[..., 0].all() and not disp[..., 1].all()
    assert float(_np(layer.dropped_count)) == 0.0
    assert float(_np(layer.expert_counts).sum()) == disp.sum()
    np.testing.assert_allclose(_np(y).reshape(-1, HIDDEN), reference_outputs(layer, x, r), atol=1e-5)
    # Dropless too.
    layer = SparseMoE(4, 8, top_k=2, second_expert_policy="random", second_expert_threshold=10.0)
    y, r = layer(x, return_routing=True)
    assert not _np(r["dispatched"])[..., 1].all()
    np.testing.assert_allclose(_np(y).reshape(-1, HIDDEN), reference_outputs(layer, x, r), atol=1e-5)


def test_config_round_trip_and_errors():
    layer = SparseMoE(4, 8, top_k=2, second_expert_policy="sampling",
                      eval_second_expert_policy="all", second_expert_threshold=0.3)
    config = layer.get_config()
    assert config["second_expert_policy"] == "sampling"
    assert SparseMoE.from_config(config).get_config() == config
    with pytest.raises(ValueError, match="top_k=2"):
        TopKRouter(4, top_k=3, second_expert_policy="random")
    with pytest.raises(ValueError, match="second_expert_policy"):
        SparseMoE(4, 8, second_expert_policy="greedy")
    with pytest.raises(ValueError, match="second_expert_threshold"):
        SparseMoE(4, 8, second_expert_policy="random", second_expert_threshold=0.0)
    with pytest.raises(ValueError, match="eval_second_expert_policy.*top_k=2"):
        SparseMoE(4, 8, top_k=1, eval_second_expert_policy="random")


def test_fit_and_save_round_trip(tmp_path):
    layer = SparseMoE(4, 8, top_k=2, second_expert_policy="random", capacity_factor=1.5,
                      eval_second_expert_policy="all", seed=4, name="moe")
    model = keras.Sequential([keras.Input((5, HIDDEN)), layer, keras.layers.Dense(1)])
    model.compile("adam", "mse")
    x = _inputs((6, 5, HIDDEN))
    history = model.fit(x, np.ones((6, 5, 1), "float32"), epochs=2, batch_size=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    path = str(tmp_path / "gshard.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("moe").router.second_expert_policy == "random"
    np.testing.assert_allclose(_np(loaded(x)), _np(model(x)), atol=1e-6)
