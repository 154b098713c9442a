"""SoftMoE: experts on soft mixtures of tokens (Puigcerver et al., 2023)."""

import math

import keras
from keras import ops

from keras_moe.layers.moe import check_mask_shape
from keras_moe.layers.sparse_moe import feed_forward_parts
from keras_moe.validation import check_float_dtype
from keras_moe.validation import check_int


def l2_normalize(x, axis=-1, epsilon=1e-6):
    """`x / sqrt(sum(x**2) + epsilon)` along `axis` (vmoe's `normalize`)."""
    return x * ops.rsqrt(ops.sum(ops.square(x), axis=axis, keepdims=True) + epsilon)


@keras.saving.register_keras_serializable(package="keras_moe")
class SoftMoE(keras.layers.Layer):
    """Soft mixture of experts: every slot is a weighted average of tokens.

    Each of the `E` experts has `slots_per_expert` slots (`n = E * p` in
    all). For the `m` tokens `x` of one example, with learned slot
    parameters `mu (hidden, E, p)` and a learned scalar `scale`:

    - `logits[t, s] = scale * <normalize(x_t), normalize(mu_s)>` (inputs
      and slot parameters L2-normalized along the hidden axis, as in vmoe);
    - dispatch weights `D = softmax(logits)` over the tokens: slot `s`
      receives `sum_t D[t, s] x_t`, and the expert that owns it runs on it;
    - combine weights `C = softmax(logits)` over the slots: token `t`
      receives `sum_s C[t, s] y_s`.

    Nothing is dropped and no auxiliary loss is needed; the experts compute
    `E * p` slots per example whatever the sequence length (choose `p` so
    that `E * p` is about the number of tokens). The routing is dense and
    fully differentiable, and it mixes tokens of the same example: like
    Expert Choice it is not causal (use it in encoders and vision models).
    The tokens of one example are all the positions of `inputs` before the
    hidden axis, after the batch axis: `(batch, tokens, hidden)` mixes each
    sequence, `(batch, h, w, hidden)` each image; a rank-2 input `(batch,
    hidden)` gives every example one token, copied into every slot.

    Masked tokens are left out of the dispatch softmax (every slot mixes
    only real tokens) and output zeros; tokens with non-finite router logits
    are left out the same way, output NaN and are counted in
    `nonfinite_count`. `expert_counts` holds each expert's soft load of the
    latest call, the sum over real tokens of the combine weight of its
    slots; `dropped_count` is always 0. The router math (normalization,
    logits, softmaxes) runs in `router_dtype`, float32 by default.

    Args:
        num_experts: int >= 1, the number of experts `E`.
        slots_per_expert: int >= 1, slots `p` per expert.
        intermediate_dim: int >= 1, the hidden width of each expert.
        activation: expert activation. Defaults to `"gelu"`.
        gated: bool, GLU experts. Defaults to `False`.
        use_bias: bool, biases in the experts. Defaults to `False`.
        expert_dropout: float in `[0, 1)`, dropout on the experts' hidden
            activations in training. Defaults to 0.0.
        router_dtype: dtype of `mu`, `scale` and the routing math.
            Defaults to `"float32"`.
        kernel_initializer: initializer of the expert kernels.
            Defaults to `"glorot_uniform"`.
        slot_initializer: initializer of `mu`. Defaults to `"lecun_normal"`
            (vmoe's; the normalization removes its scale).
        bias_initializer: initializer of the expert biases.
            Defaults to `"zeros"`.
        seed: optional int seed of the dropout noise.
        **kwargs: standard layer arguments (`name`, `dtype`, ...).

    Call arguments:
        - `inputs`: `(batch, ..., hidden)` tensor, rank >= 2.
        - `training`: bool, training mode (expert dropout).
        - `mask`: optional bool `(batch, ...)`, `False` for padding tokens.
        - `return_routing`: bool; if `True` returns `(outputs, routing)`
          with `routing` a dict of `router_logits`, `dispatch_weights` and
          `combine_weights`, each `(batch, ..., E, slots_per_expert)`
          float32.

    Examples:
        >>> import numpy as np
        >>> import keras_moe
        >>> layer = keras_moe.layers.SoftMoE(
        ...     num_experts=4, slots_per_expert=2, intermediate_dim=32)
        >>> tuple(layer(np.zeros((2, 8, 16), "float32")).shape)
        (2, 8, 16)

    References:
        - [Puigcerver et al., 2023](https://arxiv.org/abs/2308.00951)
        - vmoe's `projects/soft_moe/router.py` (`SoftRouter`).
    """

    def __init__(
        self,
        num_experts,
        slots_per_expert,
        intermediate_dim,
        activation="gelu",
        gated=False,
        use_bias=False,
        expert_dropout=0.0,
        router_dtype="float32",
        kernel_initializer="glorot_uniform",
        slot_initializer="lecun_normal",
        bias_initializer="zeros",
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, 1)
        self.slots_per_expert = check_int("slots_per_expert", slots_per_expert, 1)
        self.router_dtype = check_float_dtype("router_dtype", router_dtype)
        self.slot_initializer = keras.initializers.get(slot_initializer)
        self.experts, _, _ = feed_forward_parts(
            num_experts=num_experts,
            intermediate_dim=intermediate_dim,
            activation=activation,
            gated=gated,
            use_bias=use_bias,
            expert_dropout=expert_dropout,
            shared_intermediate_dim=0,
            shared_expert_gate=False,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            seed=seed,
            dtype=kwargs.get("dtype"),
        )
        self.seed = seed
        self.supports_masking = True

    @property
    def num_slots(self):
        """All slots, `num_experts * slots_per_expert`."""
        return self.num_experts * self.slots_per_expert

    def build(self, input_shape):
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                "SoftMoE expects inputs `(batch, ..., hidden)` of rank >= 2 with a known "
                f"hidden size. Received input_shape={input_shape}"
            )
        hidden = input_shape[-1]
        self.input_spec = keras.InputSpec(min_ndim=2, axes={-1: hidden})
        self.mu = self.add_weight(
            name="mu",
            shape=(hidden, self.num_experts, self.slots_per_expert),
            initializer=self.slot_initializer,
            dtype=self.router_dtype,
        )
        self.scale = self.add_weight(
            name="scale", shape=(), initializer="ones", dtype=self.router_dtype
        )
        if not self.experts.built:
            self.experts.build((None, hidden))
        # Statistics of the latest call, named as the MoE layer core's.
        self.expert_counts = self.add_weight(
            name="expert_counts",
            shape=(self.num_experts,),
            initializer="zeros",
            dtype="float32",
            trainable=False,
        )
        self.dropped_count = self.add_weight(
            name="dropped_count", shape=(), initializer="zeros", dtype="float32", trainable=False
        )
        self.nonfinite_count = self.add_weight(
            name="nonfinite_count", shape=(), initializer="zeros", dtype="float32", trainable=False
        )

    def routing_weights(self, x, token_mask=None):
        """Router logits and dispatch / combine weights of tokens `x (B, m, hidden)`.

        Returns `(logits, dispatch, combine, routed)`: three `(B, m, n)`
        tensors in `router_dtype` (`n = E * slots_per_expert`; `dispatch`
        sums to 1 over the routed tokens of each example for every slot,
        `combine` to 1 over the slots for every token) and `routed (B, m)`
        bool, the unmasked tokens with finite logits.
        """
        x = l2_normalize(ops.cast(x, self.router_dtype))
        mu = l2_normalize(ops.convert_to_tensor(self.mu), axis=0)
        mu = ops.reshape(mu * self.scale, (-1, self.num_slots))  # (hidden, n)
        logits = ops.matmul(x, mu)  # (B, m, n)
        routed = ops.all(ops.isfinite(logits), axis=-1)  # (B, m)
        if token_mask is not None:
            routed = ops.logical_and(routed, token_mask)
        keep = ops.expand_dims(routed, -1)
        # Dispatch: softmax over the routed tokens of each example; an
        # example without any gives its slots zeros, not NaN.
        masked = ops.where(keep, logits, float("-inf"))
        peak = ops.max(masked, axis=1, keepdims=True)
        peak = ops.where(ops.isfinite(peak), peak, 0.0)
        weights = ops.exp(masked - peak)
        dispatch = weights / ops.maximum(ops.sum(weights, axis=1, keepdims=True), 1e-30)
        # Combine: softmax over the slots; unrouted tokens' rows are unused.
        combine = ops.softmax(ops.where(keep, logits, 0.0), axis=-1)
        return logits, dispatch, combine, routed

    def call(self, inputs, training=None, mask=None, return_routing=False):
        inputs = ops.convert_to_tensor(inputs)
        if not keras.backend.is_float_dtype(inputs.dtype):
            inputs = ops.cast(inputs, self.compute_dtype)
        check_mask_shape(self, inputs, mask)
        input_shape = ops.shape(inputs)
        lead, hidden = tuple(input_shape[:-1]), input_shape[-1]
        batch, rest = input_shape[0], tuple(input_shape[1:-1])
        tokens = math.prod(rest) if all(isinstance(n, int) for n in rest) else -1
        if any(isinstance(n, int) and n == 0 for n in (batch, tokens)):
            return self._empty_call(inputs, return_routing)
        x = ops.reshape(inputs, (batch, tokens, hidden))  # (B, m, hidden): one group per example
        token_mask = None if mask is None else ops.reshape(ops.cast(mask, "bool"), (batch, -1))
        logits, dispatch, combine, routed = self.routing_weights(x, token_mask)
        keep = ops.expand_dims(routed, -1)
        zero = ops.zeros((), x.dtype)
        # Unrouted tokens are zeroed: a zero dispatch weight times NaN is NaN.
        x_routed = ops.where(keep, x, zero)
        dtype = x.dtype
        slots_in = ops.matmul(ops.transpose(ops.cast(dispatch, dtype), (0, 2, 1)), x_routed)
        slots_in = ops.reshape(slots_in, (batch, self.num_experts, self.slots_per_expert, hidden))
        slots_out = self.experts(slots_in, training=training)  # (B, E, p, hidden)
        slots_out = ops.reshape(slots_out, (batch, self.num_slots, hidden))
        outputs = ops.matmul(ops.cast(combine, dtype), slots_out)  # (B, m, hidden)

        outputs = ops.where(keep, outputs, zero)
        nonfinite = ops.logical_not(routed)
        if token_mask is not None:
            nonfinite = ops.logical_and(token_mask, nonfinite)
        outputs = ops.where(
            ops.expand_dims(nonfinite, -1), ops.full((), float("nan"), dtype), outputs
        )
        self._record_statistics(combine, routed, nonfinite)
        outputs = ops.reshape(outputs, input_shape)
        if not return_routing:
            return outputs
        shape = lead + (self.num_experts, self.slots_per_expert)
        return outputs, {
            "router_logits": ops.reshape(ops.cast(logits, "float32"), shape),
            "dispatch_weights": ops.reshape(ops.cast(dispatch, "float32"), shape),
            "combine_weights": ops.reshape(
                ops.cast(ops.where(keep, combine, 0.0), "float32"), shape
            ),
        }

    def _record_statistics(self, combine, routed, nonfinite):
        combine = ops.where(ops.expand_dims(routed, -1), ops.cast(combine, "float32"), 0.0)
        per_slot = ops.sum(ops.reshape(combine, (-1, self.num_slots)), axis=0)  # (n,)
        self.expert_counts.assign(
            ops.sum(ops.reshape(per_slot, (self.num_experts, self.slots_per_expert)), axis=1)
        )
        self.dropped_count.assign(0.0)
        self.nonfinite_count.assign(ops.sum(ops.cast(nonfinite, "float32")))

    def routing_statistics(self):
        """The statistics protocol of `keras_moe.routing_stats` and the callbacks.

        Soft MoE routes no token exclusively, so the figures are soft: the
        load of an expert is its share of the real tokens' combine weight
        (`expert_counts`), of the latest call (training or not). Nothing is
        ever dropped and there are no auxiliary losses.

        Returns:
            A dict: `assignment_counts` `(E,)` (the soft load),
            `expert_load` `(E,)` (its shares), `load_max_mean_ratio`,
            `dropped_fraction` (0.0), `aux_losses` (`{}`).
        """
        counts = keras.ops.convert_to_numpy(self.expert_counts.value).astype("float64")
        total = counts.sum()
        return {
            "assignment_counts": counts,
            "expert_load": counts / total if total > 0 else counts,
            "load_max_mean_ratio": float(counts.max() * self.num_experts / total) if total > 0 else 0.0,
            "dropped_fraction": 0.0,
            "aux_losses": {},
        }

    def _empty_call(self, inputs, return_routing):
        """A call without tokens: an empty output and empty routing."""
        self.expert_counts.assign(ops.zeros((self.num_experts,), "float32"))
        self.dropped_count.assign(0.0)
        self.nonfinite_count.assign(0.0)
        outputs = ops.zeros(ops.shape(inputs), self.compute_dtype)
        if not return_routing:
            return outputs
        shape = tuple(ops.shape(inputs)[:-1]) + (self.num_experts, self.slots_per_expert)
        empty = ops.zeros(shape, "float32")
        return outputs, {"router_logits": empty, "dispatch_weights": empty, "combine_weights": empty}

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs, training=None, mask=None, return_routing=False):
        outputs = keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)
        if not return_routing:
            return outputs
        shape = tuple(inputs.shape[:-1]) + (self.num_experts, self.slots_per_expert)
        return outputs, {
            name: keras.KerasTensor(shape, dtype="float32")
            for name in ("router_logits", "dispatch_weights", "combine_weights")
        }

    def get_config(self):
        config = super().get_config()
        experts = self.experts
        config.update(
            {
                "num_experts": self.num_experts,
                "slots_per_expert": self.slots_per_expert,
                "intermediate_dim": experts.intermediate_dim,
                "activation": keras.activations.serialize(experts.activation),
                "gated": experts.gated,
                "use_bias": experts.use_bias,
                "expert_dropout": experts.dropout,
                "router_dtype": self.router_dtype,
                "kernel_initializer": keras.initializers.serialize(experts.kernel_initializer),
                "slot_initializer": keras.initializers.serialize(self.slot_initializer),
                "bias_initializer": keras.initializers.serialize(experts.bias_initializer),
                "seed": self.seed,
            }
        )
        return config
