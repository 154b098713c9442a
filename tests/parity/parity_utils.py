"""Shared helpers for the parity tests against reference MoE blocks.

Weights are drawn once in the contract's layout (see `random_weights`), copied
into `SparseMoE` with `.assign(...)` and, re-laid-out, into the reference.
Inputs are resampled until every routing decision has a clear margin, so the
float32 differences between frameworks can never flip a choice.
"""

import os

# Nothing may be fetched from the Hugging Face hub: references are built from
# randomly initialized config objects only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

# float32 everywhere; outputs are O(1), so this is a few ulps of headroom.
ATOL = 1e-5
RTOL = 1e-5
# Smallest gap allowed between two router scores whose order decides routing.
MARGIN = 1e-3


def to_numpy(x):
    """A Keras-backend or torch tensor (or array) as a numpy array."""
    if hasattr(x, "detach"):  # torch, regardless of the Keras backend
        return x.detach().cpu().numpy()
    return ops.convert_to_numpy(x)


def softmax(logits):
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def random_weights(
    rng,
    hidden,
    num_experts,
    intermediate,
    *,
    gated=True,
    shared_intermediate=0,
    shared_gate=False,
    use_bias=False,
    router_bias=False,
):
    """Float32 weights in the contract's variable layout, keyed by attribute."""

    def normal(shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype("float32")

    e, h, i = num_experts, hidden, intermediate
    w = {
        "router.kernel": normal((h, e), h),
        "experts.up_kernel": normal((e, h, i), h),
        "experts.down_kernel": normal((e, i, h), i),
    }
    if router_bias:
        w["router.bias"] = normal((e,), 4.0)
    if gated:
        w["experts.gate_kernel"] = normal((e, h, i), h)
    if use_bias:
        w["experts.up_bias"] = normal((e, i), 4.0)
        w["experts.down_bias"] = normal((e, h), 4.0)
        if gated:
            w["experts.gate_bias"] = normal((e, i), 4.0)
    if shared_intermediate:
        s = shared_intermediate
        w["shared_expert.up_kernel"] = normal((h, s), h)
        w["shared_expert.down_kernel"] = normal((s, h), s)
        if gated:
            w["shared_expert.gate_kernel"] = normal((h, s), h)
    if shared_gate:
        w["shared_gate.kernel"] = normal((h, 1), h)
    return w


def _resolve(layer, path):
    obj = layer
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def assign_weights(layer, weights):
    """Copy `weights` into the layer's contract attributes, checking shapes."""
    for path, value in weights.items():
        variable = _resolve(layer, path)
        assert tuple(variable.shape) == value.shape, (
            f"{path}: layer has shape {tuple(variable.shape)}, "
            f"the contract says {value.shape}"
        )
        variable.assign(value)
    for path, value in weights.items():
        np.testing.assert_array_equal(to_numpy(_resolve(layer, path)), value)


def build_and_assign(layer, x, weights):
    """Build `layer` on `x` the way users do (by calling it), then set weights."""
    layer(x)
    assign_weights(layer, weights)
    return layer


def sample_inputs(rng, shape, accept, tries=500):
    """Standard-normal float32 inputs for which `accept(x)` is True."""
    for _ in range(tries):
        x = rng.standard_normal(shape).astype("float32")
        if accept(x):
            return x
    raise AssertionError(f"no accepted input of shape {shape} in {tries} tries")


def topk_is_clear(scores, k, margin=MARGIN):
    """True when the first k+1 sorted scores of every token differ by `margin`.

    That makes both the chosen set and its order unambiguous.
    """
    s = -np.sort(-scores, axis=-1)
    upto = min(k + 1, scores.shape[-1])
    gaps = s[..., : upto - 1] - s[..., 1:upto]
    return bool(np.all(gaps > margin))


def layer_losses(layer):
    """Sum of the losses the layer added in its last call, as a float."""
    return float(sum(float(to_numpy(loss)) for loss in layer.losses))


def check_routing(
    routing,
    *,
    top_k,
    ref_indices,
    ref_weights,
    selection_scores,
    ref_logits=None,
    ref_dispatched=None,
    valid=None,
):
    """Compare a `SparseMoE` routing dict with a reference's routing.

    Args:
        routing: the dict from `layer(x, return_routing=True)`.
        ref_indices: `(..., k)` the reference's chosen experts (any order).
        ref_weights: `(..., k)` the reference's combine weights, paired with
            `ref_indices`.
        selection_scores: `(..., E)` the scores the contract selects on
            (`scores + expert_bias`, group-masked), used to check that the k
            entries are ordered by decreasing selection score.
        ref_logits: `(..., E)` the reference's router logits, if it has them.
        ref_dispatched: `(..., k)` bool, paired with `ref_indices`; default
            all True (dropless).
        valid: `(...)` bool, tokens to compare (unmasked ones); default all.
    """
    indices = to_numpy(routing["expert_indices"])
    weights = to_numpy(routing["expert_weights"])
    dispatched = to_numpy(routing["dispatched"])
    logits = to_numpy(routing["router_logits"])
    lead = ref_indices.shape[:-1]
    assert indices.shape == lead + (top_k,)
    assert weights.shape == lead + (top_k,)
    assert dispatched.shape == lead + (top_k,)
    assert logits.shape == selection_scores.shape
    assert indices.dtype == np.int32, indices.dtype
    assert dispatched.dtype == np.bool_, dispatched.dtype
    assert logits.dtype == np.float32, logits.dtype
    if valid is None:
        valid = np.ones(lead, bool)
    if ref_dispatched is None:
        ref_dispatched = np.ones(ref_indices.shape, bool)

    if ref_logits is not None:
        np.testing.assert_allclose(
            logits[valid], ref_logits[valid], atol=ATOL, rtol=RTOL
        )

    # Same expert sets per token; pair weights and dispatch flags by expert.
    order = np.argsort(indices, axis=-1)
    ref_order = np.argsort(ref_indices, axis=-1)

    def by_expert(a, o):
        return np.take_along_axis(a, o, axis=-1)[valid]

    np.testing.assert_array_equal(
        by_expert(indices, order), by_expert(ref_indices.astype(np.int32), ref_order)
    )
    np.testing.assert_array_equal(
        by_expert(dispatched, order), by_expert(ref_dispatched, ref_order)
    )
    # A dropped assignment's weight is not used by either side; compare the
    # weights of the assignments that are computed.
    kept = by_expert(dispatched, order)
    np.testing.assert_allclose(
        by_expert(weights, order)[kept],
        by_expert(ref_weights, ref_order)[kept],
        atol=ATOL,
        rtol=RTOL,
    )
    # Contract: the k entries are ordered by decreasing selection score.
    chosen = np.take_along_axis(selection_scores, indices.astype(np.int64), -1)
    assert np.all(np.diff(chosen[valid], axis=-1) < 0), chosen[valid]


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    np.testing.assert_allclose(to_numpy(actual), expected, atol=atol, rtol=rtol)


def keras_tensor(x):
    return ops.convert_to_tensor(x, dtype=keras.config.floatx())
