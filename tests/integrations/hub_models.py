"""Tiny, randomly initialized keras-hub models for the integration tests.

Nothing is downloaded: every model is built from its constructor.
"""

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

VOCAB = 50
SEQ = 6
_COMMON = dict(vocabulary_size=VOCAB, num_query_heads=2, num_key_value_heads=1, hidden_dim=16)


def _mixtral(num_layers=1):
    return keras_hub.models.MixtralBackbone(
        **_COMMON, num_layers=num_layers, intermediate_dim=12, num_experts=4, top_k=2,
        sliding_window=8,
    )


def _qwen_moe(num_layers=1):
    return keras_hub.models.QwenMoeBackbone(
        **_COMMON, num_layers=num_layers, intermediate_dim=24, moe_intermediate_dim=12,
        shared_expert_intermediate_dim=20, num_experts=4, top_k=2, norm_top_k_prob=False,
    )


def _qwen3_moe(num_layers=1):
    return keras_hub.models.Qwen3MoeBackbone(
        **_COMMON, num_layers=num_layers, intermediate_dim=24, moe_intermediate_dim=12,
        num_experts=4, top_k=2, head_dim=8, norm_top_k_prob=True,
    )


def _qwen3_5_moe(num_layers=1):
    # Full attention only: the MoE block is the same after either attention,
    # and the linear attention's loops make tests minutes slower on JAX.
    return keras_hub.models.Qwen3_5MoeBackbone(
        **_COMMON, num_layers=num_layers, head_dim=8, moe_intermediate_dim=12,
        shared_expert_intermediate_size=20, num_experts=4, top_k=2,
        layer_types=["full_attention"] * num_layers,
    )


def _gpt_oss(num_layers=1):
    return keras_hub.models.GptOssBackbone(
        **_COMMON, num_layers=num_layers, intermediate_dim=12, num_experts=4, top_k=2,
        head_dim=8, sliding_window=8,
    )


def _gemma4(num_layers=1):
    return keras_hub.models.Gemma4Backbone(
        vocabulary_size=VOCAB, image_size=16, num_layers=num_layers, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=24, head_dim=8,
        sliding_window_pattern=2, enable_moe_block=True, num_experts=4,
        expert_intermediate_dim=12, num_experts_per_token=2,
    )


# family: (backbone factory, CausalLM class name, keras-hub adds a routing loss)
MOE_FAMILIES = {
    "mixtral": (_mixtral, "MixtralCausalLM", True),
    "qwen_moe": (_qwen_moe, "QwenMoeCausalLM", True),
    "qwen3_moe": (_qwen3_moe, "Qwen3MoeCausalLM", True),
    "qwen3_5_moe": (_qwen3_5_moe, "Qwen3_5MoeCausalLM", True),
    "gpt_oss": (_gpt_oss, "GptOssCausalLM", False),
    "gemma4": (_gemma4, "Gemma4CausalLM", False),
}

# Attributes of keras-hub decoders that hold MoE parts.
MOE_ATTRIBUTES = ("_sparse_moe_block", "mlp", "sparse_moe_block", "moe_router", "moe_expert_bank")


def redraw_moe_weights(backbone, seed=0):
    """Redraws every MoE variable at a scale where routing matters.

    keras-hub initializes these models with small weights (stddev 0.02),
    under which experts barely differ; unit-scale weights make every routing
    decision visible in the outputs. GPT-OSS's projections are drawn larger
    so that its clamp (at 7) is active for some activations.
    """
    rng = np.random.default_rng(seed)
    for decoder in backbone.transformer_layers:
        for attr in MOE_ATTRIBUTES:
            block = getattr(decoder, attr, None)
            if block is None:
                continue
            for variable in block.weights:
                shape = tuple(variable.shape)
                if len(shape) >= 2:
                    value = rng.standard_normal(shape) / np.sqrt(shape[-2])
                    if "gate_up_proj" in variable.path:
                        value = value * 4.0
                elif "scale" in variable.path:
                    value = 1.0 + 0.5 * rng.standard_normal(shape)
                else:
                    value = 0.5 * rng.standard_normal(shape)
                variable.assign(value.astype("float32"))


def inputs(family, batch=2, seq=SEQ, padded=True, seed=0):
    """Token ids and a padding mask (the second sequence right-padded)."""
    rng = np.random.default_rng(seed)
    padding_mask = np.ones((batch, seq), "int32")
    if padded:
        padding_mask[-1, seq - 2 :] = 0
    x = {
        "token_ids": rng.integers(1, VOCAB, (batch, seq)).astype("int32"),
        "padding_mask": padding_mask,
    }
    if family == "gemma4":
        x["position_ids"] = np.tile(np.arange(seq, dtype="int32"), (batch, 1))
    return x


def prompts(family, batch=2, seq=SEQ, prompt_length=3, seed=1):
    """Generation inputs: `prompt_length` prompt tokens, the rest to generate."""
    x = inputs(family, batch, seq, padded=False, seed=seed)
    x["padding_mask"] = np.zeros((batch, seq), "int32")
    x["padding_mask"][:, :prompt_length] = 1
    return x
