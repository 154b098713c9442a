"""Property tests of SparseMoE's routing and dispatch invariants."""

import os

import keras
import numpy as np
from hypothesis import example
from hypothesis import given
from hypothesis import strategies as st

from keras_moe.layers import SparseMoE
from tests.layers.sparse_moe_test import reference_outputs

HIDDEN = 4

# Every new shape compiles anew (about two seconds a call on JAX), so CI and
# the README's command draw shapes from a few fixed ones that cover the edges;
# `HYPOTHESIS_PROFILE=explore` (tests/conftest.py) draws from the whole ranges.
EXPLORE = os.environ.get("HYPOTHESIS_PROFILE") == "explore"
SHAPES = (  # (tokens, num_experts, top_k)
    (1, 1, 1),  # one token, one expert
    (12, 1, 1),  # a stack of one expert: TF's oneDNN einsum crashed on it
    (5, 2, 2),  # top_k == num_experts
    (12, 4, 3),
    (2, 6, 2),  # fewer assignments than experts: some experts get none
)
# With 1, 2, 5 and 12 tokens: groups of one token, groups that divide the
# tokens, a padded last group, and a group larger than the call.
GROUP_SIZES = (None, 1, 4, 8)
# From capacity 1 (the floor) for every expert to room for every assignment.
CAPACITY_FACTORS = (0.1, 0.5, 1.0, 1.5, 2.0)


def _np(x):
    return keras.ops.convert_to_numpy(x)


@st.composite
def configs(draw, with_mask=False):
    if EXPLORE:
        num_experts = draw(st.integers(1, 6))
        tokens = draw(st.integers(1, 12))
        top_k = draw(st.integers(1, min(3, num_experts)))
    else:
        tokens, num_experts, top_k = draw(st.sampled_from(SHAPES))
    cfg = dict(tokens=tokens, num_experts=num_experts, top_k=top_k, seed=draw(st.integers(0, 2**16)))
    if with_mask:
        cfg["mask"] = draw(st.lists(st.booleans(), min_size=tokens, max_size=tokens))
    return cfg


capacity_factors = st.floats(0.1, 2.0) if EXPLORE else st.sampled_from(CAPACITY_FACTORS)
group_sizes = st.one_of(st.none(), st.integers(1, 8)) if EXPLORE else st.sampled_from(GROUP_SIZES)


def _layer_and_inputs(cfg, **kwargs):
    layer = SparseMoE(cfg["num_experts"], 6, top_k=cfg["top_k"], gated=True, **kwargs)
    x = np.random.default_rng(cfg["seed"]).standard_normal((1, cfg["tokens"], HIDDEN)).astype("float32")
    return layer, x


def _expected_served(idx, valid, num_experts, capacity):
    """Capacity rule written out: first choices first, earlier tokens first."""
    served = np.zeros_like(valid)
    used = np.zeros(num_experts, int)
    for j in range(idx.shape[1]):
        for t in range(idx.shape[0]):
            if valid[t, j] and used[idx[t, j]] < capacity:
                served[t, j] = True
                used[idx[t, j]] += 1
    return served


# Examples that once failed, replayed by every profile.
@example(  # segfault on TF (oneDNN einsum over a stack of one expert)
    cfg=dict(tokens=12, num_experts=1, top_k=1, seed=0, mask=[True] * 12),
    capacity_factor=1.5,
    group_size=4,
)
@given(configs(with_mask=True), capacity_factors, group_sizes)
def test_capacity_rule(cfg, capacity_factor, group_size):
    layer, x = _layer_and_inputs(cfg, capacity_factor=capacity_factor, group_size=group_size)
    mask = np.array(cfg["mask"])[None]
    y, r = layer(x, mask=mask, return_routing=True)
    idx, disp = _np(r["expert_indices"])[0], _np(r["dispatched"])[0]
    valid = np.broadcast_to(mask[0][:, None], idx.shape)
    size = group_size or cfg["tokens"]
    capacity = max(1, int(np.ceil(capacity_factor * size * cfg["top_k"] / cfg["num_experts"])))
    for start in range(0, cfg["tokens"], size):
        group = slice(start, start + size)
        expected = _expected_served(idx[group], valid[group], cfg["num_experts"], capacity)
        np.testing.assert_array_equal(disp[group], expected)
        for e in range(cfg["num_experts"]):
            assert ((idx[group] == e) & disp[group]).sum() <= capacity
    # Masked tokens: zero output, never dispatched.
    assert np.all(_np(y)[0][~mask[0]] == 0)
    assert not disp[~mask[0]].any()
    np.testing.assert_allclose(_np(y).reshape(-1, HIDDEN), reference_outputs(layer, x, r), atol=1e-4)


@given(configs())
def test_dropless_equals_per_token_loop(cfg):
    layer, x = _layer_and_inputs(cfg)
    y, r = layer(x, return_routing=True)
    assert _np(r["dispatched"]).all()
    np.testing.assert_allclose(_np(y).reshape(-1, HIDDEN), reference_outputs(layer, x, r), atol=1e-4)


@given(configs(), st.randoms(use_true_random=False))
def test_dropless_is_permutation_equivariant(cfg, random):
    layer, x = _layer_and_inputs(cfg)
    perm = list(range(cfg["tokens"]))
    random.shuffle(perm)
    y = _np(layer(x))
    y_perm = _np(layer(x[:, perm]))
    np.testing.assert_allclose(y_perm, y[:, perm], atol=1e-5)
