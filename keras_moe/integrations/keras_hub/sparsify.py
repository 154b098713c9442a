"""`sparsify`: keras-hub MoE models with keras_moe layers in their MoE blocks.

keras-hub's MoE blocks compute every expert on every token (`E / k` times
the needed FLOPs) and keep their experts in block-specific layouts. Each
converter here builds the keras_moe layer that computes the same function
from the same weights, only on the chosen experts, and returns it with the
weights it takes from the block, in keras_moe's layout.
"""

from keras import ops

from keras_moe.experts import StackedExperts
from keras_moe.experts.activations import ClampedSwiGLU
from keras_moe.experts.activations import gelu_approximate
from keras_moe.integrations.keras_hub import surgery
from keras_moe.integrations.keras_hub.layers import KerasHubMoEBlock
from keras_moe.integrations.keras_hub.layers import RMSNormTopKRouter
from keras_moe.integrations.keras_hub.layers import RoutingInputs
from keras_moe.layers.moe import MoE
from keras_moe.layers.sparse_moe import SparseMoE

#: `SparseMoE` arguments `sparsify` accepts: they change how the layer
#: computes or trains, not its weights (so the converted model starts equal
#: to the original when they are left out).
OPTIONS = (
    "capacity_factor",
    "eval_capacity_factor",
    "group_size",
    "load_balance_loss_weight",
    "router_z_loss_weight",
    "expert_bias_update_rate",
    "batch_prioritized_routing",
    "router_jitter",
    "expert_dropout",
)

# Decoder attributes that hold a keras-hub MoE block, by model family.
_BLOCK_ATTRIBUTES = ("_sparse_moe_block", "mlp", "sparse_moe_block")


def sparsify(model, **options):
    """Replaces the MoE blocks of a keras-hub model by keras_moe layers.

    Each MoE block of the backbone (of `model`, or of `model.backbone` for a
    task such as a `CausalLM`) becomes a `KerasHubMoEBlock` around a
    keras_moe layer that holds the block's weights and routes exactly as
    the block does, but computes only the chosen experts (keras-hub's blocks
    compute every expert on every token). Supported, as keras-hub 0.32
    ships them:

    - Mixtral: softmax top-k, renormalized; router jitter.
    - Qwen-MoE (Qwen 1.5/2): `norm_top_k_prob`, a shared expert scaled by a
      sigmoid gate; dense layers of `mlp_only_layers` stay as they are.
    - Qwen3-MoE: `norm_top_k_prob`.
    - Qwen3.5-MoE: renormalized top-k, gated shared expert.
    - GPT-OSS: router bias, expert biases, the clamped SwiGLU
      (`keras_moe.experts.ClampedSwiGLU`); softmax over the top-k logits
      equals the renormalized softmax.
    - Gemma 4 (`enable_moe_block=True`): the router on the un-normalized
      residual (`keras_moe.integrations.keras_hub.RMSNormTopKRouter`, with
      the per-dimension and per-expert scales), gated tanh-GELU experts on
      the normalized one.

    The load-balancing loss keeps each block's coefficient (none for GPT-OSS
    and Gemma 4, which add none) and equals keras-hub's. The model is
    converted in place and returned: its functional graph, inputs, outputs,
    every other weight and methods such as `generate` stay; the backbone
    becomes an instance of `Sparse<Backbone>`, a registered subclass that
    saves with `model.save(...)` and loads with `keras.models.load_model`
    (after `import keras_moe.integrations.keras_hub`). Convert before
    compiling for training, or compile again afterwards.

    Padding tokens (from the padding mask the decoders pass their blocks)
    are not routed and get no MoE output; every real token's hidden state
    equals the original model's.

    Args:
        model: a `keras_hub.models.Backbone` of one of the families above,
            or a `keras_hub.models.Task` (e.g. `MixtralCausalLM`) built on
            one.
        **options: `SparseMoE` arguments that do not change the weights:
            `capacity_factor`, `eval_capacity_factor`, `group_size`,
            `load_balance_loss_weight`, `router_z_loss_weight`,
            `expert_bias_update_rate`, `batch_prioritized_routing`,
            `router_jitter`, `expert_dropout`. Defaults: the block's own
            (dropless; capacity factors make the model drop assignments,
            so it no longer equals the original).

    Returns:
        `model`, converted.

    Examples:
        >>> import keras_hub
        >>> from keras_moe.integrations.keras_hub import sparsify
        >>> backbone = keras_hub.models.MixtralBackbone(
        ...     vocabulary_size=64, num_layers=1, num_query_heads=2,
        ...     num_key_value_heads=1, hidden_dim=16, intermediate_dim=8,
        ...     num_experts=4, top_k=2,
        ... )
        >>> backbone = sparsify(backbone)
        >>> type(backbone).__name__
        'SparseMixtralBackbone'
        >>> type(backbone.transformer_layers[0]._sparse_moe_block.moe).__name__
        'SparseMoE'
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"`sparsify` accepts the SparseMoE arguments {list(OPTIONS)}. "
            f"Received unknown arguments: {unknown}"
        )
    return surgery.convert_model(model, "sparsify", options)


def _sparsify_backbone(backbone, **options):
    converted = 0
    for decoder in surgery.transformer_layers(backbone):
        converted += _sparsify_decoder(decoder, options)
    if not converted:
        raise ValueError(
            f"`sparsify` found no keras-hub MoE block in {type(backbone).__name__}: "
            "it converts Mixtral, Qwen-MoE, Qwen3-MoE, Qwen3.5-MoE, GPT-OSS and Gemma 4 "
            "(enable_moe_block=True) models that have not been sparsified yet. "
            "For a dense model, see `upcycle`."
        )


surgery.CONVERSIONS["sparsify"] = _sparsify_backbone


def _sparsify_decoder(decoder, options):
    """Converts the MoE blocks of one decoder; returns how many."""
    gemma4_bank = surgery.keras_hub_classes(("gemma4.gemma4_moe", "Gemma4MoEBlock"))
    if gemma4_bank and isinstance(getattr(decoder, "moe_expert_bank", None), gemma4_bank):
        _sparsify_gemma4(decoder, options)
        return 1
    converted = 0
    for attr in _BLOCK_ATTRIBUTES:
        block = getattr(decoder, attr, None)
        converter = _converter(block)
        if converter is None:
            continue
        moe, weights, returns = converter(block, options)
        new = KerasHubMoEBlock(moe, returns=returns, dtype=block.dtype_policy, name=attr.lstrip("_"))
        surgery.build_under(decoder, new, (None, None, block.hidden_dim))
        surgery.assign_weights(moe, weights)
        surgery.replace_sublayer(decoder, attr, new)
        converted += 1
    return converted


def _converter(block):
    for module, name, converter in (
        ("mixtral.mixtral_decoder", "MixtralSparseMoeBlock", _mixtral),
        ("qwen_moe.qwen_moe_decoder", "QwenSparseMoeBlock", _qwen_moe),
        ("qwen3_moe.qwen3_moe_decoder", "Qwen3SparseMoeBlock", _qwen3_moe),
        ("qwen3_5_moe.qwen3_5_moe_decoder", "Qwen3_5MoeSparseMoeBlock", _qwen3_5_moe),
        ("gpt_oss.gpt_oss_decoder", "GptOssSparseMoeBlock", _gpt_oss),
    ):
        cls = surgery.keras_hub_class(module, name)
        if cls is not None and isinstance(block, cls):
            return converter
    return None


def _sparse_moe(block, options, **arguments):
    """A `SparseMoE` with the block's arguments, then the user's options."""
    arguments.update(options)
    return SparseMoE(gated=True, dtype=block.dtype_policy, name="moe", **arguments)


def _split_gate_up(fused):
    """Qwen's fused `(E, hidden, 2I)` kernel -> gate `[..., :I]`, up `[..., I:]`."""
    gate, up = ops.split(ops.convert_to_tensor(fused), 2, axis=-1)
    return gate, up


def _mixtral(block, options):
    bank = block.expert_bank
    moe = _sparse_moe(
        block,
        options,
        num_experts=block.num_experts,
        intermediate_dim=block.intermediate_dim,
        top_k=block.top_k,
        activation=bank.activation,
        normalize_top_k=True,
        router_jitter=block.router_jitter_noise,
        load_balance_loss_weight=block.router_aux_loss_coef,
    )
    weights = {
        "router.kernel": block._sparse_feedforward_gate_dense.kernel,
        "experts.gate_kernel": bank._expert_feedforward_gate_dense,
        "experts.up_kernel": bank._expert_feedforward_intermediate_dense,
        "experts.down_kernel": bank._expert_feedforward_output_dense,
    }
    return moe, weights, "router_logits"


def _qwen_experts(block, router_dense):
    bank = block.expert_bank
    gate, up = _split_gate_up(bank._expert_feedforward_gate_dense)
    return {
        "router.kernel": router_dense.kernel,
        "experts.gate_kernel": gate,
        "experts.up_kernel": up,
        "experts.down_kernel": bank._expert_feedforward_output_dense,
    }


def _shared_expert(mlp, gate_dense):
    return {
        "shared_expert.gate_kernel": mlp._feedforward_gate_dense.kernel,
        "shared_expert.up_kernel": mlp._feedforward_intermediate_dense.kernel,
        "shared_expert.down_kernel": mlp._feedforward_output_dense.kernel,
        "shared_gate.kernel": gate_dense.kernel,
    }


def _qwen_moe(block, options):
    moe = _sparse_moe(
        block,
        options,
        num_experts=block.num_experts,
        intermediate_dim=block.intermediate_dim,
        top_k=block.top_k,
        activation=block.expert_bank.activation,
        normalize_top_k=bool(block.norm_top_k_prob),
        shared_intermediate_dim=block.intermediate_dim_shared,
        shared_expert_gate=True,
        load_balance_loss_weight=block.router_aux_loss_coefficient,
    )
    weights = _qwen_experts(block, block._sparse_feedforward_gate_dense)
    weights.update(_shared_expert(block.shared_expert_dense, block.shared_expert_gate_dense))
    return moe, weights, "router_logits"


def _qwen3_moe(block, options):
    moe = _sparse_moe(
        block,
        options,
        num_experts=block.num_experts,
        intermediate_dim=block.intermediate_dim,
        top_k=block.top_k,
        activation=block.expert_bank.activation,
        normalize_top_k=bool(block.norm_top_k_prob),
        load_balance_loss_weight=block.router_aux_loss_coefficient,
    )
    return moe, _qwen_experts(block, block._sparse_feedforward_gate_dense), "router_logits"


def _qwen3_5_moe(block, options):
    moe = _sparse_moe(
        block,
        options,
        num_experts=block.num_experts,
        intermediate_dim=block.moe_intermediate_dim,
        top_k=block.top_k,
        activation="silu",
        normalize_top_k=True,
        shared_intermediate_dim=block.shared_expert_intermediate_size,
        shared_expert_gate=True,
        load_balance_loss_weight=block.router_aux_loss_coefficient,
    )
    weights = _qwen_experts(block, block._router_gate)
    weights.update(_shared_expert(block.shared_expert, block._shared_expert_gate))
    return moe, weights, "router_logits"


def _gpt_oss(block, options):
    experts = block.experts
    moe = _sparse_moe(
        block,
        options | {"load_balance_loss_weight": options.get("load_balance_loss_weight", 0.0)},
        num_experts=block.num_experts,
        intermediate_dim=block.intermediate_dim,
        top_k=block.top_k,
        activation=ClampedSwiGLU(alpha=experts.alpha, limit=experts.limit),
        use_bias=True,
        router_bias=True,
        normalize_top_k=True,
    )
    # The fused projections interleave gate and up columns: gate at even
    # positions, up at odd ones.
    width = 2 * block.intermediate_dim
    even, odd = list(range(0, width, 2)), list(range(1, width, 2))
    gate_up, gate_up_bias = experts.gate_up_proj, experts.gate_up_proj_bias
    weights = {
        "router.kernel": block.router.router_dense.kernel,
        "router.bias": block.router.router_dense.bias,
        "experts.gate_kernel": ops.take(gate_up, even, axis=-1),
        "experts.up_kernel": ops.take(gate_up, odd, axis=-1),
        "experts.down_kernel": experts.down_proj,
        "experts.gate_bias": ops.take(gate_up_bias, even, axis=-1),
        "experts.up_bias": ops.take(gate_up_bias, odd, axis=-1),
        "experts.down_bias": experts.down_proj_bias,
    }
    return moe, weights, "router_scores"


def _sparsify_gemma4(decoder, options):
    """Gemma 4: the router reads the residual, the experts its normalized copy.

    The decoder calls `moe_router(x)` and hands the result to
    `moe_expert_bank(normalized_x, ...)`. The router's place goes to
    `RoutingInputs`, which hands `x` on; the expert bank's to a
    `KerasHubMoEBlock` that routes `x` and runs the experts on
    `normalized_x`.
    """
    router, bank = decoder.moe_router, decoder.moe_expert_bank
    moe_options = {k: options[k] for k in ("capacity_factor", "eval_capacity_factor", "group_size") if k in options}
    renamed = {"router_z_loss_weight": "z_loss_weight", "router_jitter": "jitter"}
    router_options = {
        renamed.get(k, k): v
        for k, v in options.items()
        if k
        in (
            "load_balance_loss_weight",
            "router_z_loss_weight",
            "expert_bias_update_rate",
            "batch_prioritized_routing",
            "router_jitter",
        )
    }
    router_options.setdefault("load_balance_loss_weight", 0.0)
    moe = MoE(
        router=RMSNormTopKRouter(
            num_experts=router.num_experts,
            top_k=router.num_experts_per_token,
            epsilon=router.layer_norm_epsilon,
            normalize_top_k=True,
            name="router",
            **router_options,
        ),
        experts=StackedExperts(
            num_experts=bank.num_experts,
            intermediate_dim=bank.expert_intermediate_dim,
            activation=gelu_approximate,
            gated=True,
            dropout=options.get("expert_dropout", 0.0),
            dtype=bank.dtype_policy,
            name="experts",
        ),
        dtype=bank.dtype_policy,
        name="moe",
        **moe_options,
    )
    new = KerasHubMoEBlock(moe, returns="outputs", dtype=bank.dtype_policy, name="moe_expert_bank")
    surgery.build_under(decoder, new, (None, bank.hidden_dim))
    surgery.assign_weights(
        moe,
        {
            "router.kernel": router.proj.kernel,
            "router.input_scale": router.per_dim_scale,
            "router.expert_scale": bank.per_expert_scale,
            "experts.gate_kernel": bank.gate_proj,
            "experts.up_kernel": bank.up_proj,
            "experts.down_kernel": bank.down_proj,
        },
    )
    surgery.replace_sublayer(decoder, "moe_expert_bank", new)
    passthrough = RoutingInputs(dtype=router.dtype_policy, name="moe_router")
    surgery.build_under(decoder, passthrough, (None, None, bank.hidden_dim))
    surgery.replace_sublayer(decoder, "moe_router", passthrough)
