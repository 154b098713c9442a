"""Layers that stand in for keras-hub's MoE blocks inside their decoders.

keras-hub decoders call their MoE block with the block's own signature and
expect its own return value. `KerasHubMoEBlock` wraps any keras_moe routed
layer behind that interface, so a decoder runs it without a change to the
decoder's code. `RMSNormTopKRouter` is Gemma 4's router as a keras_moe router.
"""

import keras
from keras import ops

from keras_moe.layers.moe import MoE
from keras_moe.routers import TopKRouter
from keras_moe.validation import check_choice
from keras_moe.validation import check_positive

RETURNS = ("router_logits", "router_scores", "outputs")


@keras.saving.register_keras_serializable(package="keras_moe")
class KerasHubMoEBlock(keras.layers.Layer):
    """A keras_moe layer behind the interface of a keras-hub MoE block.

    keras-hub's MoE blocks take `(hidden_states, attention_mask=None,
    training=None)` and return `(outputs, router_logits)` (Mixtral, the Qwen
    MoE family), `(outputs, router_scores)` (GPT-OSS: the dense per-expert
    combine weights) or only the outputs (Gemma 4's expert bank, which gets
    its router's input as second argument). This layer does the same with
    a keras_moe routed layer inside, which computes only the chosen experts.

    The attention mask, when the decoder passes one, marks padding: a
    `(batch, seq)` padding mask as is, a `(batch, seq, seq)` attention mask
    by its rows with any visible key (as keras-hub's own load-balancing loss
    reads it). Padding tokens are then not routed and output zero (the
    decoder's residual carries them); real tokens get exactly what the
    keras-hub block computes.

    Args:
        moe: the routed layer, a `keras_moe.layers.MoE` (e.g. `SparseMoE`).
        returns: `"router_logits"`, `"router_scores"` or `"outputs"`, what
            the block returns next to its outputs. Defaults to
            `"router_logits"`.
        **kwargs: standard layer arguments.

    Examples:
        >>> import numpy as np
        >>> import keras_moe
        >>> from keras_moe.integrations.keras_hub import KerasHubMoEBlock
        >>> block = KerasHubMoEBlock(
        ...     keras_moe.layers.SparseMoE(num_experts=4, intermediate_dim=8)
        ... )
        >>> outputs, router_logits = block(np.zeros((2, 3, 16), "float32"))
        >>> tuple(outputs.shape), tuple(router_logits.shape)
        ((2, 3, 16), (6, 4))
    """

    def __init__(self, moe, returns="router_logits", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(moe, MoE):
            raise ValueError(
                f"`moe` must be a keras_moe.layers.MoE layer. Received: moe={moe!r}"
            )
        self.moe = moe
        self.returns = check_choice("returns", returns, RETURNS)

    def build(self, input_shape):
        if not self.moe.built:
            self.moe.build(input_shape)

    def call(self, hidden_states, router_inputs=None, attention_mask=None, training=None):
        mask = padding_mask_of(attention_mask, hidden_states)
        if router_inputs is not None:
            router_inputs = ops.reshape(router_inputs, ops.shape(hidden_states))
        if self.returns == "outputs":
            return self.moe(
                hidden_states, training=training, mask=mask, router_inputs=router_inputs
            )
        outputs, routing = self.moe(
            hidden_states,
            training=training,
            mask=mask,
            router_inputs=router_inputs,
            return_routing=True,
        )
        num_experts = self.moe.num_experts
        if self.returns == "router_logits":
            return outputs, ops.reshape(routing["router_logits"], (-1, num_experts))
        # (T, E): each token's combine weight per expert, zero off its choices.
        chosen = ops.one_hot(
            ops.reshape(routing["expert_indices"], (-1, self.moe.router.num_selected)),
            num_experts,
            dtype="float32",
        )  # (T, k, E)
        weights = ops.reshape(routing["expert_weights"], (-1, self.moe.router.num_selected, 1))
        return outputs, ops.sum(chosen * ops.cast(weights, "float32"), axis=1)

    def compute_output_spec(
        self, hidden_states, router_inputs=None, attention_mask=None, training=None
    ):
        outputs = keras.KerasTensor(hidden_states.shape, dtype=self.compute_dtype)
        if self.returns == "outputs":
            return outputs
        tokens = None
        if all(d is not None for d in hidden_states.shape[:-1]):
            tokens = 1
            for d in hidden_states.shape[:-1]:
                tokens *= d
        return outputs, keras.KerasTensor((tokens, self.moe.num_experts), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            {"moe": keras.saving.serialize_keras_object(self.moe), "returns": self.returns}
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["moe"] = keras.saving.deserialize_keras_object(config["moe"])
        return cls(**config)


def padding_mask_of(attention_mask, hidden_states):
    """The `(batch, seq)` bool padding mask a keras-hub decoder passed, or None.

    A `(batch, seq, seq)` attention mask counts a token as real when it may
    attend to any key. A mask whose shape does not match the tokens (e.g. a
    cache-length mask during decoding) is not a padding mask of these tokens
    and is ignored, as keras-hub's blocks ignore masks outside training.
    """
    if attention_mask is None:
        return None
    mask = ops.convert_to_tensor(attention_mask)
    if len(mask.shape) == 3:
        mask = ops.any(ops.cast(mask, "bool"), axis=-1)
    lead = tuple(hidden_states.shape[:-1])
    if len(mask.shape) != len(lead) or any(
        a is not None and b is not None and a != b for a, b in zip(mask.shape, lead)
    ):
        return None
    return ops.cast(mask, "bool")


@keras.saving.register_keras_serializable(package="keras_moe")
class RoutingInputs(keras.layers.Layer):
    """Passes its input through: the router input of a split MoE block.

    Gemma 4 decoders call a router on the residual stream and hand its
    result to the expert bank, which gets a normalized copy of the stream.
    When a `KerasHubMoEBlock` takes the expert bank's place and does the
    routing itself, this layer takes the router's place and hands the
    residual stream over as the block's `router_inputs`.
    """

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="keras_moe")
class RMSNormTopKRouter(TopKRouter):
    """Top-k router on RMS-normalized inputs, with per-expert output scales.

    Gemma 4's router: the input is RMS-normalized without a learned scale,
    multiplied by `hidden ** -0.5` and by the learned per-dimension
    `input_scale`, then routed as by `TopKRouter` (softmax, top-k,
    renormalized). Each combine weight is then multiplied by its expert's
    learned `expert_scale`, which scales the expert's output exactly as
    Gemma 4's per-expert output scale does.

    Args:
        num_experts: int >= 1, the number of experts `E`.
        epsilon: float > 0 added to the mean square. Defaults to 1e-6.
        **kwargs: the arguments of `keras_moe.routers.TopKRouter`.

    Examples:
        >>> import numpy as np
        >>> router = RMSNormTopKRouter(num_experts=4, top_k=2)
        >>> plan = router(np.random.rand(1, 6, 8).astype("float32"))
        >>> tuple(plan.expert_weights.shape)
        (1, 6, 2)

    References:
        - keras-hub 0.32's `Gemma4Router`
          (`keras_hub/src/models/gemma4/gemma4_moe.py`).
    """

    def __init__(self, num_experts, epsilon=1e-6, **kwargs):
        super().__init__(num_experts=num_experts, **kwargs)
        self.epsilon = check_positive("epsilon", epsilon)

    def build_state(self, input_shape):
        super().build_state(input_shape)
        self.input_scale = self.add_weight(
            name="input_scale", shape=(input_shape[-1],), initializer="ones"
        )
        self.expert_scale = self.add_weight(
            name="expert_scale", shape=(self.num_experts,), initializer="ones"
        )

    def call(self, inputs, token_mask=None, training=None, defer_losses=False):
        x = ops.cast(inputs, self.compute_dtype)
        x = x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + self.epsilon)
        x = x * (float(x.shape[-1]) ** -0.5) * self.input_scale
        return super().call(
            x, token_mask=token_mask, training=training, defer_losses=defer_losses
        )

    def compute_routing(self, inputs, logits, routed, training):
        plan = super().compute_routing(inputs, logits, routed, training)
        scales = ops.take(self.expert_scale, plan.expert_indices, axis=0)  # (G, S, k)
        return plan._replace(expert_weights=plan.expert_weights * scales)

    def get_config(self):
        config = super().get_config()
        config["epsilon"] = self.epsilon
        return config
