"""Parity of `SparseMoE` with the MoE blocks inside keras-hub's models.

The keras-hub blocks run under the current Keras backend. Both sides get the
same random weights (in the contract's layout for `SparseMoE`, re-laid-out for
keras-hub), then on the same inputs we compare:

- the block output (float32, atol 1e-5) and the router logits;
- `routing["expert_indices"]` / `routing["expert_weights"]` with the routing
  the block applies: for GPT-OSS the block returns its dense per-expert combine
  weights; Mixtral and Qwen return only logits, so their choices are taken as
  the top-k of the block's own softmax (ordered as keras-hub orders them);
- the load-balancing loss each block adds in training. keras-hub's
  `compute_load_balancing_loss` averages the assignment fractions over the k
  choices, so it equals the contract's `load_balancing_loss` exactly (it is
  *not* top_k times it, unlike Hugging Face's), with and without padding.

keras-hub blocks compute every token, padding included; the contract zeroes
padded tokens, so masked runs compare only the real tokens' outputs.
"""

import numpy as np
import pytest

from tests.parity import parity_utils as pu

pytest.importorskip("keras_hub")

import keras  # noqa: E402

from keras_moe import losses as moe_losses  # noqa: E402
from keras_moe.layers import SparseMoE  # noqa: E402

HIDDEN = 8
SHAPE = (2, 5, HIDDEN)
AUX_COEF = 0.5


def _mixtral(w, e, k, i, s):
    from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock

    block = MixtralSparseMoeBlock(
        hidden_dim=HIDDEN,
        intermediate_dim=i,
        num_experts=e,
        top_k=k,
        router_jitter_noise=0.0,
        router_aux_loss_coef=AUX_COEF,
    )
    block.build(SHAPE)
    bank = block.expert_bank
    return block, [
        (block._sparse_feedforward_gate_dense.kernel, w["router.kernel"]),
        (bank._expert_feedforward_gate_dense, w["experts.gate_kernel"]),
        (bank._expert_feedforward_intermediate_dense, w["experts.up_kernel"]),
        (bank._expert_feedforward_output_dense, w["experts.down_kernel"]),
    ]


def _qwen_experts(block, w):
    bank = block.expert_bank
    # Fused (E, H, 2I): `ops.split(gate_up, 2)` -> gate first, then up.
    gate_up = np.concatenate([w["experts.gate_kernel"], w["experts.up_kernel"]], -1)
    return [
        (block._sparse_feedforward_gate_dense.kernel, w["router.kernel"]),
        (bank._expert_feedforward_gate_dense, gate_up),
        (bank._expert_feedforward_output_dense, w["experts.down_kernel"]),
    ]


def _qwen_moe(w, e, k, i, s):
    from keras_hub.src.models.qwen_moe.qwen_moe_decoder import QwenSparseMoeBlock

    block = QwenSparseMoeBlock(
        hidden_dim=HIDDEN,
        moe_intermediate_dim=i,
        shared_expert_intermediate_dim=s,
        num_experts=e,
        top_k=k,
        norm_top_k_prob=False,
        router_aux_loss_coefficient=AUX_COEF,
    )
    block.build(SHAPE)
    shared = block.shared_expert_dense
    return block, _qwen_experts(block, w) + [
        (shared._feedforward_gate_dense.kernel, w["shared_expert.gate_kernel"]),
        (shared._feedforward_intermediate_dense.kernel, w["shared_expert.up_kernel"]),
        (shared._feedforward_output_dense.kernel, w["shared_expert.down_kernel"]),
        (block.shared_expert_gate_dense.kernel, w["shared_gate.kernel"]),
    ]


def _qwen3_moe(w, e, k, i, s):
    from keras_hub.src.models.qwen3_moe.qwen3_moe_decoder import Qwen3SparseMoeBlock

    block = Qwen3SparseMoeBlock(
        hidden_dim=HIDDEN,
        moe_intermediate_dim=i,
        num_experts=e,
        top_k=k,
        norm_top_k_prob=True,
        router_aux_loss_coefficient=AUX_COEF,
    )
    block.build(SHAPE)
    return block, _qwen_experts(block, w)


# name: (builder, E, k, I, shared width, SparseMoE kwargs, attention-mask rank)
SOFTMAX_TOPK = {
    "mixtral": (_mixtral, 4, 2, 12, 0, dict(normalize_top_k=True), 2),
    "qwen_moe": (
        _qwen_moe,
        6,
        2,
        6,
        10,
        dict(
            normalize_top_k=False,
            shared_intermediate_dim=10,
            shared_expert_gate=True,
        ),
        3,
    ),
    "qwen3_moe": (_qwen3_moe, 6, 3, 6, 0, dict(normalize_top_k=True), 3),
}


def _assign(variables):
    """Assign `(keras_hub_variable, value)` pairs, checking shapes."""
    for variable, value in variables:
        assert tuple(variable.shape) == value.shape, (variable.path, value.shape)
        variable.assign(value)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("model", sorted(SOFTMAX_TOPK))
def test_keras_hub_softmax_topk_block_parity(model, masked):
    builder, e, k, i, s, extra, mask_rank = SOFTMAX_TOPK[model]
    rng = np.random.default_rng(17)
    w = pu.random_weights(
        rng, HIDDEN, e, i, shared_intermediate=s, shared_gate=bool(s)
    )
    block, variables = builder(w, e, k, i, s)
    _assign(variables)
    x = pu.sample_inputs(
        rng, SHAPE, lambda x: pu.topk_is_clear(pu.softmax(x @ w["router.kernel"]), k)
    )
    mask = np.ones(SHAPE[:-1], bool)
    if masked:
        mask[0, 3:] = False
        mask[1, 1:] = False
    # keras-hub's Mixtral takes a (batch, seq) padding mask, the Qwen blocks a
    # (batch, seq, seq) attention mask of which they keep `any(axis=-1)`.
    if mask_rank == 2:
        hub_mask = mask
    else:
        hub_mask = mask[:, :, None] & mask[:, None, :]

    layer = SparseMoE(
        num_experts=e,
        intermediate_dim=i,
        top_k=k,
        score_func="softmax",
        gated=True,
        activation="silu",
        capacity_factor=None,
        load_balance_loss_weight=AUX_COEF,
        router_z_loss_weight=0.0,
        **extra,
    )
    pu.build_and_assign(layer, x, w)
    call_mask = {"mask": mask} if masked else {}
    hub_kwargs = {"attention_mask": hub_mask} if masked else {}

    for training in (False, True):
        ref_out, ref_logits = block(pu.keras_tensor(x), training=training, **hub_kwargs)
        ref_out = pu.to_numpy(ref_out)
        ref_logits = pu.to_numpy(ref_logits).reshape(SHAPE[:-1] + (e,))
        probs = pu.softmax(ref_logits.astype("float64"))
        ref_indices = np.argsort(-probs, axis=-1)[..., :k]
        ref_weights = np.take_along_axis(probs, ref_indices, -1)
        if extra["normalize_top_k"]:
            ref_weights = ref_weights / ref_weights.sum(-1, keepdims=True)

        out, routing = layer(
            x, training=training, return_routing=True, **call_mask
        )
        out = pu.to_numpy(out)
        np.testing.assert_allclose(out[mask], ref_out[mask], atol=pu.ATOL, rtol=pu.RTOL)
        np.testing.assert_array_equal(out[~mask], 0.0)
        pu.check_routing(
            routing,
            top_k=k,
            ref_indices=ref_indices,
            ref_weights=ref_weights,
            selection_scores=probs,
            ref_logits=ref_logits,
            valid=mask,
        )

    # Both layers add weight * loss in training only; same weight on both sides.
    hub_loss = pu.layer_losses(block)
    np.testing.assert_allclose(pu.layer_losses(layer), hub_loss, rtol=1e-5, atol=1e-7)
    functional = moe_losses.load_balancing_loss(
        keras.ops.softmax(routing["router_logits"], axis=-1),
        routing["expert_indices"],
        mask=mask if masked else None,
    )
    np.testing.assert_allclose(
        AUX_COEF * float(pu.to_numpy(functional)), hub_loss, rtol=1e-5, atol=1e-7
    )


# --------------------------------------------------------------------------
# GPT-OSS (keras-hub `gpt_oss_decoder.py`).

GPT_OSS_ALPHA = 1.702


@keras.saving.register_keras_serializable(package="keras_moe_parity_hub")
def gpt_oss_glu(x):
    """GPT-OSS's gate activation `x * sigmoid(alpha * x)` (without the clamp)."""
    return x * keras.ops.sigmoid(GPT_OSS_ALPHA * x)


def test_keras_hub_gpt_oss_block_parity():
    """keras-hub GPT-OSS block expressed with gated, biased contract experts.

    keras-hub computes `down((clip(up) + 1) * glu(clip(gate))) + down_bias`
    with an interleaved fused gate/up kernel. The `+ 1` is folded into
    `experts.up_bias`; inputs keep every pre-activation below the clip limit
    (7.0), where the clip is the identity. Routing is top-k on the (biased)
    logits then softmax over the k = softmax, top-k, renormalize. The block
    has no auxiliary loss.
    """
    from keras_hub.src.models.gpt_oss.gpt_oss_decoder import GptOssSparseMoeBlock

    e, k, i = 4, 2, 6
    rng = np.random.default_rng(23)
    w = pu.random_weights(rng, HIDDEN, e, i, use_bias=True, router_bias=True)
    block = GptOssSparseMoeBlock(
        hidden_dim=HIDDEN, intermediate_dim=i, num_experts=e, top_k=k
    )
    block.build(SHAPE)
    gate_up = np.empty((e, HIDDEN, 2 * i), "float32")
    gate_up[..., ::2] = w["experts.gate_kernel"]
    gate_up[..., 1::2] = w["experts.up_kernel"]
    gate_up_bias = np.empty((e, 2 * i), "float32")
    gate_up_bias[..., ::2] = w["experts.gate_bias"]
    gate_up_bias[..., 1::2] = w["experts.up_bias"]
    _assign(
        [
            (block.router.router_dense.kernel, w["router.kernel"]),
            (block.router.router_dense.bias, w["router.bias"]),
            (block.experts.gate_up_proj, gate_up),
            (block.experts.gate_up_proj_bias, gate_up_bias),
            (block.experts.down_proj, w["experts.down_kernel"]),
            (block.experts.down_proj_bias, w["experts.down_bias"]),
        ]
    )
    limit = block.experts.limit

    def accept(x):
        flat = x.reshape(-1, HIDDEN)
        gate = np.einsum("th,ehi->eti", flat, w["experts.gate_kernel"])
        up = np.einsum("th,ehi->eti", flat, w["experts.up_kernel"])
        gate = gate + w["experts.gate_bias"][:, None]
        up = up + w["experts.up_bias"][:, None]
        below_clip = gate.max() < limit - 0.5 and np.abs(up).max() < limit - 0.5
        logits = flat @ w["router.kernel"] + w["router.bias"]
        return below_clip and pu.topk_is_clear(pu.softmax(logits), k)

    x = pu.sample_inputs(rng, SHAPE, accept)
    ref_out, ref_scores = block(pu.keras_tensor(x))
    ref_out = pu.to_numpy(ref_out)
    # (tokens, E) dense combine weights, zero off the chosen experts.
    ref_scores = pu.to_numpy(ref_scores).reshape(SHAPE[:-1] + (e,))
    ref_indices = np.argsort(-ref_scores, axis=-1)[..., :k]
    ref_weights = np.take_along_axis(ref_scores, ref_indices, -1)
    assert (ref_weights > 0).all()
    logits = x @ w["router.kernel"] + w["router.bias"]

    keras_w = dict(w)
    keras_w["experts.up_bias"] = w["experts.up_bias"] + 1.0
    layer = SparseMoE(
        num_experts=e,
        intermediate_dim=i,
        top_k=k,
        score_func="softmax",
        normalize_top_k=True,
        gated=True,
        use_bias=True,
        router_bias=True,
        activation=gpt_oss_glu,
        capacity_factor=None,
    )
    pu.build_and_assign(layer, x, keras_w)
    out, routing = layer(x, return_routing=True)
    pu.assert_close(out, ref_out)
    pu.check_routing(
        routing,
        top_k=k,
        ref_indices=ref_indices,
        ref_weights=ref_weights,
        selection_scores=pu.softmax(logits.astype("float64")),
        ref_logits=logits,
    )
