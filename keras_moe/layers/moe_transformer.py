"""Transformer encoder and decoder blocks whose feed-forward is a routed layer.

`MoETransformerEncoder` / `MoETransformerDecoder` take the constructor
arguments of `keras_hub.layers.TransformerEncoder` / `TransformerDecoder` and
behave as they do (attention, padding and attention masks, implicit Keras
masks, decoding caches, cross-attention, `normalize_first`, dropout), with
the feed-forward network replaced by a keras_moe routed layer. They build
on keras-hub's attention layers and mask utilities, imported when a block is
built, so `import keras_moe` does not import keras-hub.
"""

import inspect

import keras

from keras_moe.layers.sparse_moe import SparseMoE
from keras_moe.validation import check_bool
from keras_moe.validation import check_int
from keras_moe.validation import check_positive
from keras_moe.validation import check_rate


def _clone_initializer(initializer):
    # A fresh instance per sublayer, as keras-hub does, so that sublayers
    # sharing one user initializer do not start from the same values.
    if not isinstance(initializer, keras.initializers.Initializer):
        return initializer
    return initializer.__class__.from_config(initializer.get_config())


def _auto_name(class_name):
    try:
        from keras.src.utils.naming import auto_name
    except ImportError:  # pragma: no cover - Keras' private module moved
        return None
    return auto_name(class_name)


def _keras_hub_utils():
    try:
        from keras.src.backend import get_keras_mask
        from keras_hub.src.layers.modeling import transformer_layer_utils as utils
    except ImportError as error:  # pragma: no cover - keras-hub is a test dependency
        raise ImportError(
            "MoETransformerEncoder and MoETransformerDecoder use keras-hub's attention "
            "layers: `pip install keras-hub`."
        ) from error
    return utils, get_keras_mask


class _MoETransformerBlock(keras.layers.Layer):
    """What the encoder and decoder blocks share: arguments and feed-forward."""

    def __init__(
        self,
        intermediate_dim,
        num_heads,
        dropout=0,
        activation="relu",
        layer_norm_epsilon=1e-05,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        normalize_first=False,
        moe=None,
        **kwargs,
    ):
        if kwargs.get("name") is None:
            # Keras would call `MoETransformerEncoder` "mo_e_transformer_encoder".
            kwargs["name"] = _auto_name(type(self).__name__.replace("MoE", "Moe"))
        super().__init__(**kwargs)
        self.intermediate_dim = check_int("intermediate_dim", intermediate_dim, 1)
        self.num_heads = check_int("num_heads", num_heads, 1)
        self.dropout = check_rate("dropout", dropout)
        self.activation = keras.activations.get(activation)
        self.layer_norm_epsilon = check_positive("layer_norm_epsilon", layer_norm_epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.normalize_first = check_bool("normalize_first", normalize_first)
        self.moe = self._make_moe(moe)
        # A layer passed in belongs to this block from now on.
        object.__setattr__(self.moe, "_moe_transformer_owner", self.name)
        self._moe_takes_mask = "mask" in inspect.signature(self.moe.call).parameters
        self.supports_masking = True

    def _make_moe(self, moe):
        if isinstance(moe, dict) and "class_name" in moe:  # a serialized layer
            moe = keras.saving.deserialize_keras_object(moe)
        if isinstance(moe, dict):
            arguments = {
                # The keras-hub feed-forward these blocks replace: biased
                # Dense layers with the block's activation and initializers.
                "intermediate_dim": self.intermediate_dim,
                "activation": self.activation,
                "use_bias": True,
                "kernel_initializer": _clone_initializer(self.kernel_initializer),
                "bias_initializer": _clone_initializer(self.bias_initializer),
                "dtype": self.dtype_policy,
                "name": "moe",
            }
            arguments.update(moe)
            if "num_experts" not in arguments:
                raise ValueError(
                    "`moe` as a dict holds SparseMoE arguments and needs `num_experts`. "
                    f"Received: moe={moe}"
                )
            return SparseMoE(**arguments)
        if not isinstance(moe, keras.layers.Layer):
            raise ValueError(
                "`moe` must be a keras_moe routed layer (e.g. "
                "`keras_moe.layers.SparseMoE(num_experts=8, intermediate_dim=...)`) or a "
                f"dict of SparseMoE arguments (e.g. {{'num_experts': 8}}). Received: moe={moe!r}"
            )
        owner = getattr(moe, "_moe_transformer_owner", None)
        if owner is not None:
            raise ValueError(
                f"The routed layer {moe.name!r} already is the feed-forward of block "
                f"{owner!r}; each block needs a layer of its own (or pass a dict of "
                "arguments)."
            )
        return moe

    def _build_feedforward(self, inputs_shape):
        self._feedforward_layer_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="feedforward_layer_norm",
        )
        self._feedforward_layer_norm.build(inputs_shape)
        self._feedforward_dropout = keras.layers.Dropout(
            rate=self.dropout, dtype=self.dtype_policy, name="feedforward_dropout"
        )
        if not self.moe.built:
            self.moe.build(inputs_shape)

    def _feedforward(self, x, token_mask, training):
        residual = x
        if self.normalize_first:
            x = self._feedforward_layer_norm(x)
        if self._moe_takes_mask:
            x = self.moe(x, training=training, mask=token_mask)
        else:
            x = self.moe(x, training=training)
        x = self._feedforward_dropout(x, training=training)
        x = x + residual
        if not self.normalize_first:
            x = self._feedforward_layer_norm(x)
        return x

    @staticmethod
    def _token_mask(inputs, padding_mask, get_keras_mask):
        """The tokens to route: the explicit padding mask, else Keras' mask."""
        mask = padding_mask if padding_mask is not None else get_keras_mask(inputs)
        if mask is None:
            return None
        mask = keras.ops.convert_to_tensor(mask)
        tokens = tuple(inputs.shape[:-1])
        if len(mask.shape) != len(tokens) or any(
            a is not None and b is not None and a != b for a, b in zip(mask.shape, tokens)
        ):
            return None  # not a per-token mask of these inputs
        return keras.ops.cast(mask, "bool")

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "intermediate_dim": self.intermediate_dim,
                "num_heads": self.num_heads,
                "dropout": self.dropout,
                "activation": keras.activations.serialize(self.activation),
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "normalize_first": self.normalize_first,
                "moe": keras.saving.serialize_keras_object(self.moe),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class MoETransformerEncoder(_MoETransformerBlock):
    """Transformer encoder block with a mixture-of-experts feed-forward.

    `keras_hub.layers.TransformerEncoder` (Vaswani et al., 2017) with its
    feed-forward network replaced by a keras_moe routed layer: self-attention
    with residual and layer norm (before each sub-block with
    `normalize_first=True`, after it otherwise), then the routed layer with
    residual and layer norm. Masks work as in keras-hub: an explicit
    `padding_mask` and/or `attention_mask`, or the implicit Keras mask of the
    inputs (e.g. from `Embedding(mask_zero=True)` or
    `keras_hub.layers.TokenAndPositionEmbedding(mask_zero=True)`). Padding
    tokens are not routed (they take no expert capacity and stay out of the
    routing losses). The routed layer's auxiliary losses reach `fit` through
    `model.losses`.

    With one expert, top-1 and `use_bias=True`, the block computes exactly
    what the keras-hub block computes with the same weights.

    Args:
        intermediate_dim: int, the expert width when `moe` is a dict.
        num_heads: int, attention heads.
        dropout: float in `[0, 1)`, dropout of the attention and of both
            sub-blocks' outputs. Defaults to 0.
        activation: the experts' activation when `moe` is a dict. Defaults
            to `"relu"`.
        layer_norm_epsilon: float. Defaults to 1e-5.
        kernel_initializer: initializer of the attention and (dict `moe`)
            expert kernels. Defaults to `"glorot_uniform"`.
        bias_initializer: initializer of their biases. Defaults to
            `"zeros"`.
        normalize_first: bool, pre-norm (GPT-2) instead of post-norm (BERT).
            Defaults to `False`.
        moe: the routed feed-forward: a keras_moe layer of its own (e.g.
            `SparseMoE(...)`, `MoE(router, experts)`), or a dict of
            `SparseMoE` arguments completed by the block's (`intermediate_dim`,
            `activation`, initializers, `use_bias=True`), e.g.
            `{"num_experts": 8, "top_k": 2}`. Required.
        **kwargs: standard layer arguments.

    Call arguments:
        - `inputs`: `(batch, seq, hidden)`.
        - `padding_mask`: optional `(batch, seq)`, True for real tokens.
        - `attention_mask`: optional `(batch, seq, seq)`.
        - `training`: bool.
        - `return_attention_scores`: bool; if True returns
          `(outputs, attention_scores)`.

    Examples:
        >>> import numpy as np
        >>> import keras_moe
        >>> encoder = keras_moe.layers.MoETransformerEncoder(
        ...     intermediate_dim=32, num_heads=2, moe={"num_experts": 4, "top_k": 2}
        ... )
        >>> tuple(encoder(np.zeros((2, 5, 16), "float32")).shape)
        (2, 5, 16)

    References:
        - [Vaswani et al., 2017](https://arxiv.org/abs/1706.03762)
        - [Lepikhin et al., 2020 (GShard)](https://arxiv.org/abs/2006.16668)
    """

    def build(self, inputs_shape):
        hidden_dim = inputs_shape[-1]
        key_dim = int(hidden_dim // self.num_heads)
        if key_dim == 0:
            raise ValueError(
                "Attention `key_dim` computed cannot be zero. The `hidden_dim` value of "
                f"{hidden_dim} has to be equal to or greater than `num_heads` value of "
                f"{self.num_heads}."
            )
        self._self_attention_layer = keras.layers.MultiHeadAttention(
            num_heads=self.num_heads,
            key_dim=key_dim,
            dropout=self.dropout,
            kernel_initializer=_clone_initializer(self.kernel_initializer),
            bias_initializer=_clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name="self_attention_layer",
        )
        self._self_attention_layer.build(query_shape=inputs_shape, value_shape=inputs_shape)
        self._self_attention_layer_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="self_attention_layer_norm",
        )
        self._self_attention_layer_norm.build(inputs_shape)
        self._self_attention_dropout = keras.layers.Dropout(
            rate=self.dropout, dtype=self.dtype_policy, name="self_attention_dropout"
        )
        self._build_feedforward(inputs_shape)

    def call(
        self,
        inputs,
        padding_mask=None,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
    ):
        utils, get_keras_mask = _keras_hub_utils()
        token_mask = self._token_mask(inputs, padding_mask, get_keras_mask)
        self_attention_mask = utils.merge_padding_and_attention_mask(
            inputs, padding_mask, attention_mask
        )
        x = inputs
        residual = x
        if self.normalize_first:
            x = self._self_attention_layer_norm(x)
        attention = self._self_attention_layer(
            query=x,
            value=x,
            attention_mask=self_attention_mask,
            return_attention_scores=return_attention_scores,
            training=training,
        )
        if return_attention_scores:
            x, attention_scores = attention
        else:
            x = attention
        x = self._self_attention_dropout(x, training=training)
        x = x + residual
        if not self.normalize_first:
            x = self._self_attention_layer_norm(x)

        x = self._feedforward(x, token_mask, training)
        if return_attention_scores:
            return x, attention_scores
        return x


@keras.saving.register_keras_serializable(package="keras_moe")
class MoETransformerDecoder(_MoETransformerBlock):
    """Transformer decoder block with a mixture-of-experts feed-forward.

    `keras_hub.layers.TransformerDecoder` with its feed-forward network
    replaced by a keras_moe routed layer: causal self-attention, optional
    cross-attention to an encoder sequence (built when the block is first
    called with one), then the routed layer, each sub-block with residual,
    dropout and layer norm (pre-norm with `normalize_first=True`). Masks and
    decoding caches work as in keras-hub: `decoder_padding_mask`,
    `decoder_attention_mask`, the encoder's masks, implicit Keras masks,
    `self_attention_cache` / `cross_attention_cache` with their update
    indices, and `use_causal_mask`. Padding tokens are not routed. A dropless
    routed layer (no capacity factor at inference) routes every token on
    its own, so cached decoding gives the same outputs as a full forward
    pass. The routed layer's auxiliary losses reach `fit`.

    With one expert, top-1 and `use_bias=True`, the block computes exactly
    what the keras-hub block computes with the same weights.

    Args:
        intermediate_dim: int, the expert width when `moe` is a dict.
        num_heads: int, attention heads.
        dropout: float in `[0, 1)`. Defaults to 0.
        activation: the experts' activation when `moe` is a dict. Defaults
            to `"relu"`.
        layer_norm_epsilon: float. Defaults to 1e-5.
        kernel_initializer: defaults to `"glorot_uniform"`.
        bias_initializer: defaults to `"zeros"`.
        normalize_first: bool. Defaults to `False`.
        moe: a keras_moe routed layer, or a dict of `SparseMoE` arguments
            (see `MoETransformerEncoder`). Required.
        **kwargs: standard layer arguments.

    Call arguments: those of `keras_hub.layers.TransformerDecoder.call`:
        `decoder_sequence`, `encoder_sequence=None`,
        `decoder_padding_mask=None`, `decoder_attention_mask=None`,
        `encoder_padding_mask=None`, `encoder_attention_mask=None`,
        `self_attention_cache=None`, `self_attention_cache_update_index=None`,
        `cross_attention_cache=None`, `cross_attention_cache_update_index=None`,
        `use_causal_mask=True`, `training=None`. Returns the outputs, or with
        a self-attention cache `(outputs, self_attention_cache)` (and the
        cross-attention cache with cross-attention).

    Examples:
        >>> import numpy as np
        >>> import keras_moe
        >>> decoder = keras_moe.layers.MoETransformerDecoder(
        ...     intermediate_dim=32, num_heads=2, moe={"num_experts": 4, "top_k": 2}
        ... )
        >>> tuple(decoder(np.zeros((2, 5, 16), "float32")).shape)
        (2, 5, 16)

    References:
        - [Vaswani et al., 2017](https://arxiv.org/abs/1706.03762)
        - [Fedus et al., 2021 (Switch)](https://arxiv.org/abs/2101.03961)
    """

    def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
        from keras_hub.layers import CachedMultiHeadAttention

        hidden_dim = decoder_sequence_shape[-1]
        head_dim = int(hidden_dim // self.num_heads)
        if head_dim == 0:
            raise ValueError(
                "Attention `head_dim` computed cannot be zero. The `hidden_dim` value of "
                f"{hidden_dim} has to be equal to or greater than `num_heads` value of "
                f"{self.num_heads}."
            )

        def attention(name, value_dim=None):
            return CachedMultiHeadAttention(
                num_heads=self.num_heads,
                key_dim=head_dim,
                value_dim=value_dim,
                dropout=self.dropout,
                kernel_initializer=_clone_initializer(self.kernel_initializer),
                bias_initializer=_clone_initializer(self.bias_initializer),
                dtype=self.dtype_policy,
                name=name,
            )

        def norm_and_dropout(prefix):
            norm = keras.layers.LayerNormalization(
                epsilon=self.layer_norm_epsilon,
                dtype=self.dtype_policy,
                name=f"{prefix}_layer_norm",
            )
            norm.build(decoder_sequence_shape)
            dropout = keras.layers.Dropout(
                rate=self.dropout, dtype=self.dtype_policy, name=f"{prefix}_dropout"
            )
            return norm, dropout

        self._self_attention_layer = attention("self_attention")
        self._self_attention_layer.build(
            query_shape=decoder_sequence_shape, value_shape=decoder_sequence_shape
        )
        self._self_attention_layer_norm, self._self_attention_dropout = norm_and_dropout(
            "self_attention"
        )
        self._cross_attention_layer = None
        if encoder_sequence_shape:
            self._cross_attention_layer = attention("cross_attention", value_dim=head_dim)
            self._cross_attention_layer.build(
                query_shape=decoder_sequence_shape, value_shape=encoder_sequence_shape
            )
            self._cross_attention_layer_norm, self._cross_attention_dropout = (
                norm_and_dropout("cross_attention")
            )
        self._build_feedforward(decoder_sequence_shape)

    def call(
        self,
        decoder_sequence,
        encoder_sequence=None,
        decoder_padding_mask=None,
        decoder_attention_mask=None,
        encoder_padding_mask=None,
        encoder_attention_mask=None,
        self_attention_cache=None,
        self_attention_cache_update_index=None,
        cross_attention_cache=None,
        cross_attention_cache_update_index=None,
        use_causal_mask=True,
        training=None,
    ):
        utils, get_keras_mask = _keras_hub_utils()
        has_cross_attention = self._cross_attention_layer is not None
        if has_cross_attention != (encoder_sequence is not None):
            raise ValueError(
                f"{type(self).__name__} was built "
                f"{'with' if has_cross_attention else 'without'} cross-attention: call it "
                f"{'with' if has_cross_attention else 'without'} `encoder_sequence` every "
                "time (the number of call arguments must not change)."
            )
        if has_cross_attention and (self_attention_cache is None) != (
            cross_attention_cache is None
        ):
            raise ValueError(
                "With cross-attention, `self_attention_cache` and `cross_attention_cache` "
                "must both be set or both be None. Received: "
                f"self_attention_cache={self_attention_cache}, "
                f"cross_attention_cache={cross_attention_cache}"
            )
        token_mask = self._token_mask(decoder_sequence, decoder_padding_mask, get_keras_mask)
        self_attention_mask = self._self_attention_mask(
            utils,
            decoder_sequence,
            decoder_padding_mask,
            decoder_attention_mask,
            use_causal_mask,
            self_attention_cache,
            self_attention_cache_update_index,
        )

        x = decoder_sequence
        residual = x
        if self.normalize_first:
            x = self._self_attention_layer_norm(x)
        attention = self._self_attention_layer(
            query=x,
            value=x,
            attention_mask=self_attention_mask,
            cache=self_attention_cache,
            cache_update_index=self_attention_cache_update_index,
            training=training,
        )
        if self_attention_cache is None:
            x = attention
        else:
            x, self_attention_cache = attention
        x = self._self_attention_dropout(x, training=training)
        x = x + residual
        if not self.normalize_first:
            x = self._self_attention_layer_norm(x)

        if has_cross_attention:
            cross_attention_mask = utils.merge_padding_and_attention_mask(
                encoder_sequence, encoder_padding_mask, encoder_attention_mask
            )
            residual = x
            if self.normalize_first:
                x = self._cross_attention_layer_norm(x)
            attention = self._cross_attention_layer(
                query=x,
                value=encoder_sequence,
                attention_mask=cross_attention_mask,
                cache=cross_attention_cache,
                cache_update_index=cross_attention_cache_update_index,
                training=training,
            )
            if cross_attention_cache is None:
                x = attention
            else:
                x, cross_attention_cache = attention
            x = self._cross_attention_dropout(x, training=training)
            x = x + residual
            if not self.normalize_first:
                x = self._cross_attention_layer_norm(x)

        x = self._feedforward(x, token_mask, training)
        if self_attention_cache is None:
            return x
        if has_cross_attention:
            return x, self_attention_cache, cross_attention_cache
        return x, self_attention_cache

    def _self_attention_mask(
        self,
        utils,
        decoder_sequence,
        decoder_padding_mask,
        decoder_attention_mask,
        use_causal_mask,
        self_attention_cache,
        self_attention_cache_update_index,
    ):
        decoder_mask = utils.merge_padding_and_attention_mask(
            decoder_sequence, decoder_padding_mask, decoder_attention_mask
        )
        if not use_causal_mask:
            return decoder_mask
        batch_size = keras.ops.shape(decoder_sequence)[0]
        input_length = output_length = keras.ops.shape(decoder_sequence)[1]
        # Cached decoding: queries are the new tokens, keys the whole cache.
        if self_attention_cache is not None:
            input_length = keras.ops.shape(self_attention_cache)[2]
        causal_mask = utils.compute_causal_mask(
            batch_size,
            input_length,
            output_length,
            0 if self_attention_cache_update_index is None else self_attention_cache_update_index,
        )
        if decoder_mask is None:
            return causal_mask
        return keras.ops.minimum(decoder_mask, causal_mask)
