"""Property tests of the routers' invariants (few shapes: JAX compiles per shape)."""

import math

import keras
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_moe.layers import ExpertChoiceMoE
from keras_moe.layers import SoftMoE
from keras_moe.layers import SparseMoE
from keras_moe.routers import NoisyTopKRouter
from keras_moe.routers import TopKRouter

HIDDEN = 4
FEW = settings(max_examples=10, deadline=None)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _inputs(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _mask(data, shape):
    flat = data.draw(st.lists(st.booleans(), min_size=math.prod(shape), max_size=math.prod(shape)))
    return np.array(flat, bool).reshape(shape)


@FEW
@given(
    st.sampled_from([(8, 2, 1), (8, 4, 2)]),  # (tokens, experts, top_k)
    st.sampled_from([0.25, 0.5, 1.0]),
    st.integers(0, 2**16),
    st.data(),
)
def test_batch_prioritized_capacity_goes_to_the_most_confident(shape, capacity_factor, seed, data):
    """Within a choice rank, an expert serves its most confident tokens first."""
    tokens, num_experts, top_k = shape
    layer = SparseMoE(num_experts, 6, top_k=top_k, capacity_factor=capacity_factor,
                      batch_prioritized_routing=True)
    x = _inputs((1, tokens, HIDDEN), seed)
    mask = _mask(data, (1, tokens))
    _, r = layer(x, mask=mask, return_routing=True)
    logits = _np(r["router_logits"])[0]
    priority = np.exp(logits - logits.max(-1, keepdims=True))
    priority = (priority / priority.sum(-1, keepdims=True)).max(-1)
    idx, disp = _np(r["expert_indices"])[0], _np(r["dispatched"])[0]
    capacity = max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))
    expected = np.zeros_like(disp)
    used = np.zeros(num_experts, int)
    for j in range(top_k):
        for t in np.argsort(-priority, kind="stable"):
            if mask[0, t] and used[idx[t, j]] < capacity:
                expected[t, j] = True
                used[idx[t, j]] += 1
    np.testing.assert_array_equal(disp, expected)


@FEW
@given(
    st.sampled_from([(2, 6, 3), (1, 12, 4)]),  # (batch, tokens, experts)
    st.sampled_from([0.5, 1.0, 2.0]),
    st.sampled_from([None, 6]),
    st.integers(0, 2**16),
    st.data(),
)
def test_expert_choice_fills_every_expert(shape, capacity_factor, group_size, seed, data):
    """Each expert takes exactly its capacity when enough real tokens exist."""
    batch, tokens, num_experts = shape
    layer = ExpertChoiceMoE(num_experts, 6, capacity_factor=capacity_factor, group_size=group_size)
    x = _inputs(shape[:2] + (HIDDEN,), seed)
    mask = _mask(data, (batch, tokens))
    y, r = layer(x, mask=mask, return_routing=True)
    idx = _np(r["expert_indices"]).reshape(-1, num_experts)
    disp = _np(r["dispatched"]).reshape(-1, num_experts)
    flat_mask = mask.reshape(-1)
    size = group_size or batch * tokens
    capacity = min(size, math.ceil(size * capacity_factor / num_experts))
    for start in range(0, batch * tokens, size):
        group = slice(start, start + size)
        real = flat_mask[group].sum()
        for e in range(num_experts):
            chosen = ((idx[group] == e) & disp[group]).sum()
            assert chosen == min(capacity, real)
    assert not disp[~flat_mask].any()
    assert np.all(_np(y)[~mask] == 0)


@FEW
@given(st.sampled_from([(2, 5, 3, 2), (1, 9, 2, 4)]), st.integers(0, 2**16), st.data())
def test_soft_moe_dispatch_and_combine_sum_to_one(shape, seed, data):
    batch, tokens, num_experts, slots = shape
    layer = SoftMoE(num_experts, slots, 6)
    x = 3 * _inputs((batch, tokens, HIDDEN), seed)
    mask = _mask(data, (batch, tokens))
    _, r = layer(x, mask=mask, return_routing=True)
    dispatch, combine = _np(r["dispatch_weights"]), _np(r["combine_weights"])
    for b in range(batch):
        if mask[b].any():
            np.testing.assert_allclose(dispatch[b][mask[b]].sum(0), 1.0, rtol=1e-4)
        assert np.all(dispatch[b][~mask[b]] == 0)
    np.testing.assert_allclose(combine[mask].sum((-1, -2)), 1.0, rtol=1e-4)


@FEW
@given(st.sampled_from(["random", "sampling"]), st.floats(0.05, 0.6), st.integers(0, 2**16))
def test_second_expert_policies(policy, threshold, seed):
    """The first expert is always served; a kept second one differs from it."""
    router = TopKRouter(4, top_k=2, second_expert_policy=policy,
                        second_expert_threshold=threshold, seed=seed)
    x = _inputs((2, 8, HIDDEN), seed)
    plan = router(x, training=True)
    idx, w, disp = _np(plan.expert_indices), _np(plan.expert_weights), _np(plan.dispatch_mask)
    assert disp[..., 0].all() and (idx[..., 0] != idx[..., 1]).all()
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    if policy == "random":
        assert disp[..., 1][w[..., 1] >= threshold].all()
    else:
        assert disp.all()


@FEW
@given(st.sampled_from([(6, 4, 1), (6, 5, 2)]), st.integers(0, 2**16))
def test_noisy_top_k_weights_are_a_softmax_over_the_kept_logits(shape, seed):
    tokens, num_experts, top_k = shape
    router = NoisyTopKRouter(num_experts, top_k=top_k, seed=seed)
    plan = router(_inputs((1, tokens, HIDDEN), seed), training=True)
    logits, idx = _np(plan.router_logits), _np(plan.expert_indices)
    np.testing.assert_array_equal(np.sort(idx, -1), np.sort(np.argsort(-logits, -1)[..., :top_k], -1))
    kept = np.take_along_axis(logits, idx, -1)
    expected = np.exp(kept - kept.max(-1, keepdims=True))
    np.testing.assert_allclose(_np(plan.expert_weights), expected / expected.sum(-1, keepdims=True),
                               rtol=1e-5)
    for name in ("importance", "load"):
        assert np.isfinite(float(_np(plan.aux_losses[name])))
