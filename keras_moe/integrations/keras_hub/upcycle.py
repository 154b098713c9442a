"""`upcycle`: sparse upcycling of dense keras-hub decoders into MoE models.

keras-hub's dense decoders compute their feed-forward network inline in
`call`, from three projection layers. Upcycling gives such a decoder a
`SparseMoE` whose experts are copies of those projections, and a subclass
of its class (`MoE<Decoder>`) whose `call` is keras-hub's with the
feed-forward lines replaced by the MoE layer; the projection layers leave
the model.
"""

import keras
from keras import ops

from keras_moe.experts.activations import gelu_approximate
from keras_moe.integrations.keras_hub import surgery
from keras_moe.integrations.keras_hub.layers import padding_mask_of
from keras_moe.integrations.keras_hub.sparsify import OPTIONS as SPARSIFY_OPTIONS
from keras_moe.layers.sparse_moe import SparseMoE
from keras_moe.validation import check_int

#: `SparseMoE` arguments `upcycle` accepts besides `num_experts` and `top_k`.
OPTIONS = SPARSIFY_OPTIONS + ("router_initializer", "normalize_top_k", "score_func", "seed")

_FEEDFORWARD = "_feedforward_moe"


def upcycle(model, num_experts, top_k, every=1, **options):
    """Sparse upcycling: dense keras-hub decoders become MoE decoders.

    In every `every`-th decoder layer (layers `i` with `(i + 1) % every ==
    0`, as keras-hub's `decoder_sparse_step`), the dense feed-forward
    network becomes a `SparseMoE` of `num_experts` experts, each a copy of
    the dense network's weights, with a newly initialized router choosing
    `top_k` of them per token (Komatsuzaki et al., 2022). The combine
    weights are renormalized to sum to one, so at initialization every
    token's output is the dense network's, whatever the router's weights:
    the upcycled model starts as the dense model and its experts drift
    apart in training. Supported decoders, as keras-hub 0.32 ships them:
    Llama / Llama 3, Mistral, Qwen (1.5/2), Qwen3 (SwiGLU) and Gemma /
    Gemma 2 (tanh-GELU GLU).

    The model is converted in place and returned; the backbone becomes an
    instance of a registered subclass (`Sparse<Backbone>`) that saves and
    loads with `keras.models.load_model` (after
    `import keras_moe.integrations.keras_hub`). Compile after upcycling.

    Args:
        model: a `keras_hub.models.Backbone` of a supported family, or a
            `keras_hub.models.Task` (e.g. `LlamaCausalLM`) built on one.
        num_experts: int >= 1, experts per upcycled layer.
        top_k: int in `[1, num_experts]`, experts per token.
        every: int >= 1, upcycle every `every`-th layer. Defaults to 1.
        **options: further `SparseMoE` arguments: `capacity_factor`,
            `eval_capacity_factor`, `group_size`, `load_balance_loss_weight`
            (default 1e-2), `router_z_loss_weight`, `expert_bias_update_rate`,
            `batch_prioritized_routing`, `router_jitter`, `expert_dropout`,
            `router_initializer` (default `"glorot_uniform"`),
            `normalize_top_k` (default `True`; `False` scales the outputs at
            initialization by the chosen scores), `score_func`, `seed`.

    Returns:
        `model`, converted.

    Examples:
        >>> import keras, numpy as np, keras_hub
        >>> from keras_moe.integrations.keras_hub import upcycle
        >>> backbone = keras_hub.models.LlamaBackbone(
        ...     vocabulary_size=64, num_layers=2, num_query_heads=2,
        ...     num_key_value_heads=1, hidden_dim=16, intermediate_dim=32,
        ... )
        >>> inputs = {"token_ids": np.ones((1, 5), "int32"),
        ...           "padding_mask": np.ones((1, 5), "int32")}
        >>> dense = keras.ops.convert_to_numpy(backbone(inputs))
        >>> backbone = upcycle(backbone, num_experts=4, top_k=2)
        >>> moe = keras.ops.convert_to_numpy(backbone(inputs))
        >>> bool(np.allclose(moe, dense, atol=1e-5))
        True

    References:
        - [Komatsuzaki et al., 2022 (Sparse Upcycling)](https://arxiv.org/abs/2212.05055)
    """
    num_experts = check_int("num_experts", num_experts, 1)
    top_k = check_int("top_k", top_k, 1, num_experts)
    every = check_int("every", every, 1)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"`upcycle` accepts the SparseMoE arguments {list(OPTIONS)}. "
            f"Received unknown arguments: {unknown}"
        )
    if "router_initializer" in options:
        # The conversion is recorded in the model's config: keep it JSON-able.
        options["router_initializer"] = keras.initializers.serialize(
            keras.initializers.get(options["router_initializer"])
        )
    arguments = {"num_experts": num_experts, "top_k": top_k, "every": every, **options}
    return surgery.convert_model(model, "upcycle", arguments)


def _upcycle_backbone(backbone, num_experts, top_k, every, **options):
    decoders = surgery.transformer_layers(backbone)
    chosen = [d for i, d in enumerate(decoders) if (i + 1) % every == 0]
    families = [_family(decoder) for decoder in chosen]
    if not chosen or any(f is None for f in families):
        names = sorted({type(d).__name__ for d, f in zip(chosen, families) if f is None})
        raise ValueError(
            f"`upcycle` converts the dense decoders of Llama, Mistral, Qwen, Qwen3 and "
            f"Gemma backbones; {type(backbone).__name__} has "
            f"{names or 'no decoder layer to upcycle'} (already upcycled layers are not "
            "upcycled again)."
        )
    for decoder, (mixin, projections, activation) in zip(chosen, families):
        _upcycle_decoder(decoder, mixin, projections, activation, num_experts, top_k, options)


surgery.CONVERSIONS["upcycle"] = _upcycle_backbone


def _upcycle_decoder(decoder, mixin, projections, activation, num_experts, top_k, options):
    gate, up, down = (getattr(decoder, name) for name in projections)
    hidden, width = tuple(gate.kernel.shape)
    moe = SparseMoE(
        num_experts=num_experts,
        intermediate_dim=width,
        top_k=top_k,
        activation=activation(decoder),
        gated=True,
        dtype=decoder.dtype_policy,
        name="feedforward_moe",
        **options,
    )
    surgery.build_under(decoder, moe, (None, None, hidden))

    def copies(kernel):
        kernel = ops.convert_to_tensor(kernel)
        return ops.broadcast_to(ops.expand_dims(kernel, 0), (num_experts,) + tuple(kernel.shape))

    surgery.assign_weights(
        moe,
        {
            "experts.gate_kernel": copies(gate.kernel),
            "experts.up_kernel": copies(up.kernel),
            "experts.down_kernel": copies(down.kernel),
        },
    )
    surgery.replace_sublayer(decoder, _FEEDFORWARD, moe)
    for name in projections:
        surgery.remove_sublayer(decoder, name)
    surgery.swap_decoder_class(decoder, mixin)


def _family(decoder):
    """`(call mixin, (gate, up, down) attribute names, activation)` or None."""
    if isinstance(decoder, (_MoELlamaCall, _MoEGemmaCall)):
        return None
    llama_family = surgery.keras_hub_classes(
        ("llama.llama_decoder", "LlamaTransformerDecoder"),
        ("mistral.mistral_transformer_decoder", "MistralTransformerDecoder"),
        ("qwen.qwen_decoder", "QwenTransformerDecoder"),
        ("qwen3.qwen3_decoder", "Qwen3TransformerDecoder"),
    )
    gemma = surgery.keras_hub_classes(("gemma.gemma_decoder_block", "GemmaDecoderBlock"))
    if llama_family and isinstance(decoder, llama_family):
        projections = (
            "_feedforward_gate_dense",
            "_feedforward_intermediate_dense",
            "_feedforward_output_dense",
        )
        return _MoELlamaCall, projections, lambda d: d.activation
    if gemma and isinstance(decoder, gemma):
        return _MoEGemmaCall, ("gating_ffw", "gating_ffw_2", "ffw_linear"), lambda d: gelu_approximate
    return None


class _MoELlamaCall:
    """`call` of keras-hub 0.32's Llama-family decoders, feed-forward -> MoE.

    Llama, Mistral, Qwen and Qwen3 decoders share this `call` line for line
    (their attention layers and masks differ, and are their own).
    """

    def call(
        self,
        decoder_sequence,
        decoder_padding_mask=None,
        decoder_attention_mask=None,
        self_attention_cache=None,
        self_attention_cache_update_index=None,
        training=None,
    ):
        self_attention_mask = self._compute_self_attention_mask(
            decoder_sequence=decoder_sequence,
            decoder_padding_mask=decoder_padding_mask,
            decoder_attention_mask=decoder_attention_mask,
            self_attention_cache=self_attention_cache,
            self_attention_cache_update_index=self_attention_cache_update_index,
        )
        residual = decoder_sequence
        x = self._self_attention_layernorm(decoder_sequence)
        x = self._self_attention_layer(
            hidden_states=x,
            attention_mask=self_attention_mask,
            cache=self_attention_cache,
            cache_update_index=self_attention_cache_update_index,
        )
        if self_attention_cache is not None:
            x, self_attention_cache = x
        x = self._self_attention_dropout(x, training=training)
        x = x + residual
        residual = x

        x = self._feedforward_layernorm(x)
        x = self._feedforward_moe(
            x, training=training, mask=padding_mask_of(decoder_padding_mask, x)
        )
        decoder_output = x + residual

        if self_attention_cache is not None:
            return decoder_output, self_attention_cache
        return decoder_output


class _MoEGemmaCall:
    """`call` of keras-hub 0.32's `GemmaDecoderBlock`, feed-forward -> MoE."""

    def call(self, x, padding_mask=None, cache=None, cache_update_index=0):
        normalized_x = self.pre_attention_norm(x)
        attention_mask = self._compute_attention_mask(
            normalized_x, padding_mask, cache, cache_update_index
        )
        if cache is not None:
            attention, new_cache = self.attention(
                normalized_x,
                attention_mask=attention_mask,
                cache=cache,
                cache_update_index=cache_update_index,
            )
        else:
            attention = self.attention(normalized_x, attention_mask=attention_mask)
        if self.use_post_attention_norm:
            attention = self.post_attention_norm(attention)
        if self.dropout:
            attention = self.attention_dropout(attention)
        attention_x = x + attention

        normalized_x = self.pre_ffw_norm(attention_x)
        x = self._feedforward_moe(normalized_x, mask=padding_mask_of(padding_mask, normalized_x))
        if self.use_post_ffw_norm:
            x = self.post_ffw_norm(x)
        x = x + attention_x

        if cache is not None:
            return x, new_cache
        return x
