"""Parity of `SparseMoE` / `SwitchFFN` with Hugging Face `transformers` MoE blocks.

Each reference block is built from a tiny, randomly initialized config object
(nothing is loaded from the hub) and always runs in PyTorch on the CPU, whatever
the Keras backend. The Keras layer is configured only through its constructor,
its weights are copied in through the contract's variable attributes, and then
on the same inputs we compare:

- the layer output with the reference block's output (float32, atol 1e-5);
- `routing["router_logits"]` with the reference router's logits;
- `routing["expert_indices"]` as a set per token with the reference's choices,
  and the order of the k entries (decreasing selection score, per the contract);
- `routing["expert_weights"]` with the reference's combine weights, paired by
  expert; `routing["dispatched"]` with the reference's capacity mask (Switch);
- the auxiliary losses where the reference defines one: the layer's
  `add_loss` in training (divided by its weight) and
  `keras_moe.losses.load_balancing_loss` / `router_z_loss` against HF's
  `load_balancing_loss_func` (= top_k x the contract's loss, see CONTRACT.md)
  and Switch's `router_z_loss_func`.

Inputs are resampled until no routing decision is closer than 1e-3, so the
comparison is never at the mercy of a tie or a float32 rounding difference.
"""

import numpy as np
import pytest

from tests.parity import parity_utils as pu

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import keras  # noqa: E402

from keras_moe import losses as moe_losses  # noqa: E402
from keras_moe.layers import SparseMoE  # noqa: E402
from keras_moe.layers import SwitchFFN  # noqa: E402

HIDDEN = 8


# --------------------------------------------------------------------------
# Torch-side helpers.


def load_reference(module, params):
    """Set every parameter/buffer named in `params`; all parameters must be.

    HF expert banks are created with `torch.empty`, so a parameter we forgot
    would hold garbage: insist that the mapping covers all of them.
    """
    state = dict(module.named_parameters())
    state.update(dict(module.named_buffers()))
    missing = set(dict(module.named_parameters())) - set(params)
    assert not missing, f"unmapped reference parameters: {sorted(missing)}"
    with torch.no_grad():
        for name, value in params.items():
            target = state[name]
            assert tuple(target.shape) == value.shape, (name, target.shape, value.shape)
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return module.eval()


def fused_experts(w):
    """Contract expert kernels -> HF's fused `gate_up_proj` (E, 2I, H) layout.

    HF stores each expert as `nn.functional.linear` weights (out, in) and
    splits the fused projection with `.chunk(2, dim=-1)`: gate first, then up.
    """
    gate = w["experts.gate_kernel"].transpose(0, 2, 1)
    up = w["experts.up_kernel"].transpose(0, 2, 1)
    return {
        "experts.gate_up_proj": np.concatenate([gate, up], axis=1),
        "experts.down_proj": w["experts.down_kernel"].transpose(0, 2, 1),
    }


def shared_mlp(w, prefix):
    """Contract shared expert -> HF `*MLP` of three `nn.Linear` (out, in)."""
    return {
        f"{prefix}.gate_proj.weight": w["shared_expert.gate_kernel"].T,
        f"{prefix}.up_proj.weight": w["shared_expert.up_kernel"].T,
        f"{prefix}.down_proj.weight": w["shared_expert.down_kernel"].T,
    }


def torch_run(fn, *args):
    with torch.no_grad():
        return fn(*(torch.from_numpy(a) for a in args))


def hf_topk_load_balancing(logits, num_experts, top_k, mask=None):
    """Mixtral-family `load_balancing_loss_func` on one layer's logits."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    attention_mask = None if mask is None else torch.from_numpy(mask.astype("int64"))
    loss = load_balancing_loss_func(
        (torch.from_numpy(logits),), num_experts, top_k, attention_mask
    )
    return float(loss)


# --------------------------------------------------------------------------
# Softmax top-k family: Mixtral, Qwen2-MoE, Qwen3-MoE.


def _mixtral(rng):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    e, k, i = 4, 2, 12
    config = MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=i,
        num_local_experts=e,
        num_experts_per_tok=k,
        router_jitter_noise=0.0,
        hidden_act="silu",
    )
    w = pu.random_weights(rng, HIDDEN, e, i)
    block = load_reference(
        MixtralSparseMoeBlock(config),
        {"gate.weight": w["router.kernel"].T, **fused_experts(w)},
    )
    kwargs = dict(
        num_experts=e,
        intermediate_dim=i,
        top_k=k,
        score_func="softmax",
        normalize_top_k=True,
        gated=True,
        activation="silu",
        capacity_factor=None,
    )
    return block, w, kwargs


def _qwen2_moe(rng):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    e, k, i, s = 6, 2, 6, 10
    config = Qwen2MoeConfig(
        hidden_size=HIDDEN,
        moe_intermediate_size=i,
        shared_expert_intermediate_size=s,
        num_experts=e,
        num_experts_per_tok=k,
        norm_topk_prob=False,
        hidden_act="silu",
    )
    w = pu.random_weights(
        rng, HIDDEN, e, i, shared_intermediate=s, shared_gate=True
    )
    block = load_reference(
        Qwen2MoeSparseMoeBlock(config),
        {
            "gate.weight": w["router.kernel"].T,
            **fused_experts(w),
            **shared_mlp(w, "shared_expert"),
            "shared_expert_gate.weight": w["shared_gate.kernel"].T,
        },
    )
    kwargs = dict(
        num_experts=e,
        intermediate_dim=i,
        top_k=k,
        score_func="softmax",
        normalize_top_k=False,
        gated=True,
        activation="silu",
        capacity_factor=None,
        shared_intermediate_dim=s,
        shared_expert_gate=True,
    )
    return block, w, kwargs


def _qwen3_moe(rng):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    e, k, i = 6, 3, 6
    config = Qwen3MoeConfig(
        hidden_size=HIDDEN,
        moe_intermediate_size=i,
        num_experts=e,
        num_experts_per_tok=k,
        norm_topk_prob=True,
        hidden_act="silu",
    )
    w = pu.random_weights(rng, HIDDEN, e, i)
    block = load_reference(
        Qwen3MoeSparseMoeBlock(config),
        {"gate.weight": w["router.kernel"].T, **fused_experts(w)},
    )
    kwargs = dict(
        num_experts=e,
        intermediate_dim=i,
        top_k=k,
        score_func="softmax",
        normalize_top_k=True,
        gated=True,
        activation="silu",
        capacity_factor=None,
    )
    return block, w, kwargs


SOFTMAX_TOPK = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe}
LB_WEIGHT = 0.5


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("model", sorted(SOFTMAX_TOPK))
def test_softmax_topk_block_parity(model, masked):
    rng = np.random.default_rng(7)
    block, w, kwargs = SOFTMAX_TOPK[model](rng)
    e, k = kwargs["num_experts"], kwargs["top_k"]
    shape = (2, 5, HIDDEN)
    x = pu.sample_inputs(
        rng, shape, lambda x: pu.topk_is_clear(pu.softmax(x @ w["router.kernel"]), k)
    )
    mask = np.ones(shape[:-1], bool)
    if masked:
        mask[0, 4:] = False
        mask[1, 2:] = False

    ref_out = pu.to_numpy(torch_run(block, x))
    ref_logits, ref_weights, ref_indices = (
        pu.to_numpy(t) for t in torch_run(block.gate, x.reshape(-1, HIDDEN))
    )
    ref_logits = ref_logits.reshape(shape[:-1] + (e,))
    ref_weights = ref_weights.reshape(shape[:-1] + (k,))
    ref_indices = ref_indices.reshape(shape[:-1] + (k,))

    layer = SparseMoE(
        load_balance_loss_weight=LB_WEIGHT, router_z_loss_weight=0.0, **kwargs
    )
    pu.build_and_assign(layer, x, w)
    call_kwargs = {"mask": mask} if masked else {}

    for training in (False, True):
        out, routing = layer(x, training=training, return_routing=True, **call_kwargs)
        out = pu.to_numpy(out)
        # Dropless and jitter-free, so training changes nothing but the losses.
        np.testing.assert_allclose(out[mask], ref_out[mask], atol=pu.ATOL, rtol=pu.RTOL)
        # Contract: masked tokens produce zero output and are not dispatched.
        np.testing.assert_array_equal(out[~mask], 0.0)
        assert not pu.to_numpy(routing["dispatched"])[~mask].any()
        pu.check_routing(
            routing,
            top_k=k,
            ref_indices=ref_indices,
            ref_weights=ref_weights,
            selection_scores=pu.softmax(ref_logits),
            ref_logits=ref_logits,
            valid=mask,
        )

    # HF's load_balancing_loss_func = top_k x the contract's loss; with an
    # attention mask both leave the padding out of f_e and P_e.
    hf_loss = hf_topk_load_balancing(
        ref_logits.reshape(-1, e), e, k, mask if masked else None
    )
    np.testing.assert_allclose(
        pu.layer_losses(layer), LB_WEIGHT * hf_loss / k, rtol=1e-5, atol=1e-7
    )
    probs = keras.ops.softmax(routing["router_logits"], axis=-1)
    functional = moe_losses.load_balancing_loss(
        probs, routing["expert_indices"], mask=mask if masked else None
    )
    np.testing.assert_allclose(
        k * float(pu.to_numpy(functional)), hf_loss, rtol=1e-5, atol=1e-7
    )


# --------------------------------------------------------------------------
# DeepSeek-V3: sigmoid scores, bias-corrected and group-limited selection.


def deepseek_selection(logits, bias, num_groups, top_groups, top_k, margin=pu.MARGIN):
    """The contract's selection scores; also whether every decision is clear.

    Returns `(masked_scores, chosen_sets, clear)`: `masked_scores` is
    `sigmoid(logits) + bias` with experts outside the `top_groups` best groups
    set to -inf (a group's score is the sum of its two highest biased scores).
    """
    scores = pu.sigmoid(logits.astype("float64")) + bias
    t, e = scores.shape
    grouped = scores.reshape(t, num_groups, e // num_groups)
    group_scores = -np.sort(-grouped, axis=-1)[..., :2].sum(-1)
    clear = pu.topk_is_clear(group_scores, top_groups, margin)
    best_groups = np.argsort(-group_scores, axis=-1)[:, :top_groups]
    allowed = np.zeros((t, num_groups), bool)
    np.put_along_axis(allowed, best_groups, True, axis=-1)
    allowed = np.repeat(allowed, e // num_groups, axis=-1)
    masked = np.where(allowed, scores, -np.inf)
    clear = clear and pu.topk_is_clear(masked, top_k, margin)
    chosen = np.sort(np.argsort(-masked, axis=-1)[:, :top_k], axis=-1)
    return masked, chosen, clear


@pytest.mark.parametrize("normalize", [True, False], ids=["norm_topk", "no_norm"])
def test_deepseek_v3_moe_parity(normalize):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    e, k, i, groups, top_groups, n_shared, scale = 12, 3, 6, 4, 2, 2, 2.5
    rng = np.random.default_rng(11)
    config = DeepseekV3Config(
        hidden_size=HIDDEN,
        moe_intermediate_size=i,
        n_routed_experts=e,
        num_experts_per_tok=k,
        n_group=groups,
        topk_group=top_groups,
        n_shared_experts=n_shared,
        routed_scaling_factor=scale,
        norm_topk_prob=normalize,
        hidden_act="silu",
    )
    w = pu.random_weights(rng, HIDDEN, e, i, shared_intermediate=i * n_shared)
    # Small nonzero correction bias, large enough to change some selections.
    w["router.expert_bias"] = rng.uniform(-0.15, 0.15, (e,)).astype("float32")
    block = load_reference(
        DeepseekV3MoE(config),
        {
            "gate.weight": w["router.kernel"].T,
            "gate.e_score_correction_bias": w["router.expert_bias"],
            **fused_experts(w),
            **shared_mlp(w, "shared_experts"),
        },
    )

    def accept(x):
        logits = x.reshape(-1, HIDDEN) @ w["router.kernel"]
        bias = w["router.expert_bias"]
        _, chosen, clear = deepseek_selection(logits, bias, groups, top_groups, k)
        # The test must exercise both the bias and the group limit: some token
        # must choose differently without the bias, and some without groups.
        _, unbiased, clear_u = deepseek_selection(
            logits, np.zeros_like(bias), groups, top_groups, k
        )
        _, ungrouped, clear_g = deepseek_selection(logits, bias, 1, 1, k)
        return (
            clear
            and clear_u
            and clear_g
            and (unbiased != chosen).any()
            and (ungrouped != chosen).any()
        )

    shape = (2, 6, HIDDEN)
    x = pu.sample_inputs(rng, shape, accept)
    ref_out = pu.to_numpy(torch_run(block, x))
    ref_logits, ref_weights, ref_indices = (
        pu.to_numpy(t) for t in torch_run(block.gate, x)
    )
    selection, _, _ = deepseek_selection(
        ref_logits, w["router.expert_bias"], groups, top_groups, k
    )

    # The contract's group masking is the one in this transformers version:
    # experts outside the chosen groups get -inf, so they can never be picked.
    # (Older DeepSeek code filled them with 0.0, which can differ when biased
    # scores are negative; the contract deliberately excludes them outright.)
    layer = SparseMoE(
        num_experts=e,
        intermediate_dim=i,
        top_k=k,
        score_func="sigmoid",
        normalize_top_k=normalize,
        routed_scaling_factor=scale,
        num_groups=groups,
        top_groups=top_groups,
        gated=True,
        activation="silu",
        capacity_factor=None,
        shared_intermediate_dim=i * n_shared,
    )
    pu.build_and_assign(layer, x, w)
    out, routing = layer(x, return_routing=True)
    pu.assert_close(out, ref_out)
    lead = shape[:-1]
    pu.check_routing(
        routing,
        top_k=k,
        ref_indices=ref_indices.reshape(lead + (k,)),
        ref_weights=ref_weights.reshape(lead + (k,)),
        selection_scores=selection.reshape(lead + (e,)),
        ref_logits=ref_logits.reshape(lead + (e,)),
    )
    # The bias only selects: it must not have leaked into the weights, which
    # for normalize_top_k sum to routed_scaling_factor.
    if normalize:
        np.testing.assert_allclose(
            pu.to_numpy(routing["expert_weights"]).sum(-1), scale, rtol=1e-5
        )


# --------------------------------------------------------------------------
# Switch Transformers: top-1, relu experts, capacity dropping.

# (batch, seq, HF expert_capacity, contract capacity_factor, group_size).
# HF's router counts capacity per sequence (cumsum over the sequence axis), so
# `group_size=seq` makes the contract's routing groups the same sequences.
# The factors are chosen so ceil(cf * group * top_k / E) lands mid-way between
# integers and equals HF's expert_capacity, with no float rounding at stake.
SWITCH_CASES = {
    # expert_capacity = seq: HF never drops; the contract layer is dropless.
    "dropless": (2, 6, 6, None, None),
    # One sequence, one routing group: 12 tokens, 4 experts x 2 slots.
    "capacity_one_group": (1, 12, 2, 0.5, None),
    # Two sequences, capacity per sequence: 8 tokens, 4 experts x 2 slots.
    "capacity_per_sequence": (2, 8, 2, 0.75, 8),
}


def _switch_layer(kind, e, i, capacity_factor, group_size, lb_weight, z_weight):
    common = dict(
        num_experts=e,
        intermediate_dim=i,
        group_size=group_size,
        router_jitter=0.0,
        load_balance_loss_weight=lb_weight,
        router_z_loss_weight=z_weight,
        activation="relu",
        gated=False,
        use_bias=False,
    )
    if kind == "SwitchFFN":
        # SwitchFFN is capacity-limited by design; for the dropless case give
        # every expert room for every token (ceil(E * T / E) = T).
        cf = float(e) if capacity_factor is None else capacity_factor
        return SwitchFFN(
            capacity_factor=cf, eval_capacity_factor=cf, expert_dropout=0.0, **common
        )
    return SparseMoE(
        top_k=1,
        normalize_top_k=False,
        score_func="softmax",
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        **common,
    )


@pytest.mark.parametrize("kind", ["SwitchFFN", "SparseMoE"])
@pytest.mark.parametrize("case", sorted(SWITCH_CASES))
def test_switch_transformers_sparse_mlp_parity(case, kind):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers import (
        modeling_switch_transformers as st,
    )

    batch, seq, expert_capacity, capacity_factor, group_size = SWITCH_CASES[case]
    e, i = 4, 12
    rng = np.random.default_rng(3)
    config = SwitchTransformersConfig(
        d_model=HIDDEN,
        d_ff=i,
        num_experts=e,
        expert_capacity=expert_capacity,
        router_bias=False,
        router_jitter_noise=0.0,
        router_dtype="float32",
        dropout_rate=0.0,
        dense_act_fn="relu",
    )
    w = pu.random_weights(rng, HIDDEN, e, i, gated=False)
    params = {"router.classifier.weight": w["router.kernel"].T}
    for n in range(e):
        params[f"experts.expert_{n}.wi.weight"] = w["experts.up_kernel"][n].T
        params[f"experts.expert_{n}.wo.weight"] = w["experts.down_kernel"][n].T
    block = load_reference(st.SwitchTransformersSparseMLP(config), params)

    shape = (batch, seq, HIDDEN)

    def accept(x):
        if not pu.topk_is_clear(pu.softmax(x @ w["router.kernel"]), 1):
            return False
        if capacity_factor is None:
            return True
        # The capacity cases must actually drop something.
        choice = np.argmax(x @ w["router.kernel"], axis=-1)
        counts = [np.bincount(c, minlength=e) for c in choice]
        return max(c.max() for c in counts) > expert_capacity

    x = pu.sample_inputs(rng, shape, accept)
    ref_out = pu.to_numpy(torch_run(block, x))
    dispatch_mask, ref_probs, ref_logits = (
        pu.to_numpy(t) for t in torch_run(block.router, x)
    )
    ref_indices = np.argmax(ref_logits, axis=-1)[..., None]
    ref_dispatched = dispatch_mask.sum(-1, keepdims=True) > 0
    if capacity_factor is not None:
        assert not ref_dispatched.all()

    logits_t = torch.from_numpy(ref_logits)
    # The contract defines the losses over all tokens of the call (one routing
    # group when group_size is None): apply HF's formulas to them as one group.
    flat_logits = logits_t.reshape(1, -1, e)
    hf_lb = float(
        st.load_balancing_loss_func(
            torch.softmax(flat_logits, dim=-1), flat_logits.argmax(dim=-1)
        )
    )
    hf_z = float(st.router_z_loss_func(flat_logits))

    for lb_weight, z_weight in ((1.0, 0.0), (0.0, 1.0)):
        layer = _switch_layer(
            kind, e, i, capacity_factor, group_size, lb_weight, z_weight
        )
        pu.build_and_assign(layer, x, w)
        for training in (False, True):
            out, routing = layer(x, training=training, return_routing=True)
            pu.assert_close(out, ref_out)
            pu.check_routing(
                routing,
                top_k=1,
                ref_indices=ref_indices,
                ref_weights=ref_probs,
                selection_scores=pu.softmax(ref_logits),
                ref_logits=ref_logits,
                ref_dispatched=ref_dispatched,
            )
        # With group_size set, how per-group losses are pooled is not part of
        # the contract, so the layer's own loss is compared only for one group.
        if group_size is None:
            expected = lb_weight * hf_lb + z_weight * hf_z
            np.testing.assert_allclose(
                pu.layer_losses(layer), expected, rtol=1e-5, atol=1e-7
            )

    logits = routing["router_logits"]
    functional_lb = moe_losses.load_balancing_loss(
        keras.ops.softmax(logits, axis=-1), routing["expert_indices"]
    )
    np.testing.assert_allclose(pu.to_numpy(functional_lb), hf_lb, rtol=1e-5)
    functional_z = moe_losses.router_z_loss(logits)
    np.testing.assert_allclose(pu.to_numpy(functional_z), hf_z, rtol=1e-5)


# --------------------------------------------------------------------------
# GPT-OSS: router bias, expert biases, clamped "(up + 1) * gate * sigmoid(1.702 gate)".

GPT_OSS_ALPHA = 1.702


@keras.saving.register_keras_serializable(package="keras_moe_parity")
def gpt_oss_glu(x):
    """GPT-OSS's gate activation `x * sigmoid(alpha * x)` (without the clamp)."""
    return x * keras.ops.sigmoid(GPT_OSS_ALPHA * x)


def test_gpt_oss_mlp_parity():
    """GPT-OSS expressed with the contract's gated, biased experts.

    HF computes `down((clamp(up) + 1) * glu(clamp(gate)))`. The `+ 1` is folded
    into `experts.up_bias`, and inputs are chosen so that no pre-activation
    reaches the clamp limit (7.0): the clamp is then the identity, which the
    test asserts. Routing is top-k on logits then softmax over the k, which
    equals softmax, top-k, renormalize.
    """
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    from transformers.models.gpt_oss.modeling_gpt_oss import (
        load_balancing_loss_func,
    )

    e, k, i = 4, 2, 6
    rng = np.random.default_rng(5)
    config = GptOssConfig(
        hidden_size=HIDDEN,
        intermediate_size=i,
        num_local_experts=e,
        num_experts_per_tok=k,
        swiglu_limit=7.0,
    )
    assert config.swiglu_alpha == GPT_OSS_ALPHA
    w = pu.random_weights(rng, HIDDEN, e, i, use_bias=True, router_bias=True)
    gate_up = np.empty((e, HIDDEN, 2 * i), "float32")
    gate_up[..., ::2] = w["experts.gate_kernel"]
    gate_up[..., 1::2] = w["experts.up_kernel"]
    gate_up_bias = np.empty((e, 2 * i), "float32")
    gate_up_bias[..., ::2] = w["experts.gate_bias"]
    gate_up_bias[..., 1::2] = w["experts.up_bias"]
    block = load_reference(
        GptOssMLP(config),
        {
            "router.weight": w["router.kernel"].T,
            "router.bias": w["router.bias"],
            "experts.gate_up_proj": gate_up,
            "experts.gate_up_proj_bias": gate_up_bias,
            "experts.down_proj": w["experts.down_kernel"],
            "experts.down_proj_bias": w["experts.down_bias"],
        },
    )
    limit = config.swiglu_limit

    def router_logits(x):
        return x.reshape(-1, HIDDEN) @ w["router.kernel"] + w["router.bias"]

    def accept(x):
        flat = x.reshape(-1, HIDDEN)
        gate = np.einsum("th,ehi->eti", flat, w["experts.gate_kernel"])
        up = np.einsum("th,ehi->eti", flat, w["experts.up_kernel"])
        gate = gate + w["experts.gate_bias"][:, None]
        up = up + w["experts.up_bias"][:, None]
        below_clamp = gate.max() < limit - 0.5 and np.abs(up).max() < limit - 0.5
        return below_clamp and pu.topk_is_clear(pu.softmax(router_logits(x)), k)

    shape = (2, 5, HIDDEN)
    x = pu.sample_inputs(rng, shape, accept)
    ref_out, _ = torch_run(block, x)
    ref_out = pu.to_numpy(ref_out)
    ref_logits, ref_weights, ref_indices = (
        pu.to_numpy(t) for t in torch_run(block.router, x.reshape(-1, HIDDEN))
    )

    keras_w = dict(w)
    keras_w["experts.up_bias"] = w["experts.up_bias"] + 1.0
    lb_weight = 0.25
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
        load_balance_loss_weight=lb_weight,
    )
    pu.build_and_assign(layer, x, keras_w)
    lead = shape[:-1]
    for training in (False, True):
        out, routing = layer(x, training=training, return_routing=True)
        pu.assert_close(out, ref_out)
        pu.check_routing(
            routing,
            top_k=k,
            ref_indices=ref_indices.reshape(lead + (k,)),
            ref_weights=ref_weights.reshape(lead + (k,)),
            selection_scores=pu.softmax(ref_logits).reshape(lead + (e,)),
            ref_logits=ref_logits.reshape(lead + (e,)),
        )
    hf_lb = float(load_balancing_loss_func((torch.from_numpy(ref_logits),), e, k))
    np.testing.assert_allclose(
        pu.layer_losses(layer), lb_weight * hf_lb / k, rtol=1e-5, atol=1e-7
    )
