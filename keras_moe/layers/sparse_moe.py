"""SparseMoE: token-choice top-k mixture-of-experts feed-forward layer."""

import keras
from keras import ops

from keras_moe import dispatch
from keras_moe import losses
from keras_moe.experts import FeedForward
from keras_moe.experts import StackedExperts
from keras_moe.routers import TopKRouter
from keras_moe.routers.top_k_router import validate_routing_args
from keras_moe.validation import check_float_dtype
from keras_moe.validation import check_int
from keras_moe.validation import check_non_negative
from keras_moe.validation import check_positive
from keras_moe.validation import check_rate


@keras.saving.register_keras_serializable(package="keras_moe")
class SparseMoE(keras.layers.Layer):
    """Token-choice top-k mixture-of-experts feed-forward layer.

    Each token is routed to `top_k` of `num_experts` feed-forward experts and
    its output is the weighted sum of theirs (plus an optional always-on
    shared expert). Only the chosen experts are computed: tokens are sorted
    or scattered to their experts, the experts run as batched contractions,
    and the results are combined back. The arguments alone express the
    published routers: Switch, GShard, Mixtral, Qwen-MoE, DeepSeekMoE /
    DeepSeek-V3, DBRX and GPT-OSS (see the routing page of the docs).

    Routing (in `router_dtype`, float32 by default, also under mixed
    precision): `logits = x @ router.kernel (+ router.bias)`;
    `scores = softmax(logits)` or `sigmoid(logits)`; the top `top_k` experts
    by `scores + router.expert_bias` (restricted to the `top_groups` best of
    `num_groups` expert groups when `num_groups > 1`); the weights are the
    chosen scores, renormalized if `normalize_top_k`, times
    `routed_scaling_factor`.

    With `capacity_factor=None` the layer is dropless: every assignment is
    computed. With a capacity factor `cf`, each expert takes at most
    `ceil(cf * tokens_in_group * top_k / num_experts)` assignments per
    routing group of `group_size` tokens; first choices are served before
    second choices, earlier tokens first, and a dropped assignment adds
    nothing (the model's residual connection carries the token). Dropped
    assignments are counted in `dropped_count` and reported by
    `return_routing=True`.

    In training the layer adds `load_balance_loss_weight *
    load_balancing_loss` and `router_z_loss_weight * router_z_loss` with
    `add_loss`, and with `expert_bias_update_rate > 0` moves the router's
    expert bias toward balance (DeepSeek-V3's aux-loss-free balancing).

    Keras masks are supported: masked tokens are not routed, use no capacity,
    produce zero output and are left out of the losses and statistics.

    Args:
        num_experts: int >= 1, the number of routed experts `E`.
        intermediate_dim: int >= 1, the hidden width of each expert.
        top_k: int in `[1, num_experts]`, experts per token. Defaults to 2.
        activation: expert activation. Defaults to `"gelu"`.
        gated: bool, GLU experts `down(act(x @ gate) * (x @ up))` (SwiGLU
            with `activation="silu"`). Defaults to `False`.
        use_bias: bool, biases in the experts. Defaults to `False`.
        score_func: `"softmax"` or `"sigmoid"`. Defaults to `"softmax"`.
        normalize_top_k: bool, renormalize the `k` chosen weights to sum 1.
            Defaults to `True`.
        routed_scaling_factor: float > 0 multiplying the weights after
            normalization. Defaults to 1.0.
        num_groups: int dividing `num_experts`, expert groups for
            group-limited routing. Defaults to 1.
        top_groups: int in `[1, num_groups]`, groups a token may use;
            `None` means all. Defaults to `None`.
        capacity_factor: float > 0 or `None` (dropless). Defaults to `None`.
        eval_capacity_factor: float > 0 or `None` (same as
            `capacity_factor`), used when not training. Defaults to `None`.
        group_size: int >= 1 or `None` (all tokens of the call form one
            group), tokens per routing group for capacity. Defaults to `None`.
        shared_intermediate_dim: int >= 0; `> 0` adds an always-on shared
            expert FFN of that width. Defaults to 0.
        shared_expert_gate: bool, scale the shared expert's output by
            `sigmoid(x @ shared_gate.kernel)`. Defaults to `False`.
        router_bias: bool, a trainable bias on the router logits.
            Defaults to `False`.
        router_jitter: float in `[0, 1)`, multiplicative uniform noise on the
            router input in training. Defaults to 0.0.
        router_dtype: dtype of the router's variables and math.
            Defaults to `"float32"`.
        load_balance_loss_weight: float >= 0. Defaults to 1e-2.
        router_z_loss_weight: float >= 0. Defaults to 0.0.
        expert_bias_update_rate: float >= 0; `> 0` enables aux-loss-free
            balancing. Defaults to 0.0.
        expert_dropout: float in `[0, 1)`, dropout on the experts' hidden
            activations in training (an extension of the contract, used by
            `SwitchFFN`). Defaults to 0.0.
        kernel_initializer: initializer of each expert's kernels (and of the
            shared expert). Defaults to `"glorot_uniform"`.
        router_initializer: initializer of the router kernel.
            Defaults to `"glorot_uniform"`.
        bias_initializer: initializer of the expert biases.
            Defaults to `"zeros"`.
        seed: optional int seed for jitter and dropout noise.
        **kwargs: standard layer arguments (`name`, `dtype`, ...).

    Call arguments:
        - `inputs`: `(..., hidden)` tensor, rank >= 2.
        - `training`: bool, training mode (losses, jitter, capacity factor).
        - `mask`: optional bool `(...)`, `False` for padding tokens.
        - `return_routing`: bool; if `True` returns `(outputs, routing)`
          with `routing` a dict of `router_logits (..., E)` float32,
          `expert_indices (..., k)` int32 (best first), `expert_weights
          (..., k)` and `dispatched (..., k)` bool.

    Examples:
        >>> import keras, numpy as np
        >>> import keras_moe
        >>> model = keras.Sequential([
        ...     keras.Input((16, 32)),
        ...     keras_moe.layers.SparseMoE(num_experts=8, intermediate_dim=64, top_k=2),
        ... ])
        >>> tuple(model(np.zeros((2, 16, 32), "float32")).shape)
        (2, 16, 32)

    References:
        - [Shazeer et al., 2017](https://arxiv.org/abs/1701.06538)
        - [Lepikhin et al., 2020 (GShard)](https://arxiv.org/abs/2006.16668)
        - [Fedus et al., 2021 (Switch)](https://arxiv.org/abs/2101.03961)
        - [Jiang et al., 2024 (Mixtral)](https://arxiv.org/abs/2401.04088)
        - [DeepSeek-AI, 2024 (DeepSeek-V3)](https://arxiv.org/abs/2412.19437)
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        top_k=2,
        activation="gelu",
        gated=False,
        use_bias=False,
        score_func="softmax",
        normalize_top_k=True,
        routed_scaling_factor=1.0,
        num_groups=1,
        top_groups=None,
        capacity_factor=None,
        eval_capacity_factor=None,
        group_size=None,
        shared_intermediate_dim=0,
        shared_expert_gate=False,
        router_bias=False,
        router_jitter=0.0,
        router_dtype="float32",
        load_balance_loss_weight=1e-2,
        router_z_loss_weight=0.0,
        expert_bias_update_rate=0.0,
        expert_dropout=0.0,
        kernel_initializer="glorot_uniform",
        router_initializer="glorot_uniform",
        bias_initializer="zeros",
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        validate_routing_args(
            num_experts=num_experts,
            top_k=top_k,
            score_func=score_func,
            routed_scaling_factor=routed_scaling_factor,
            num_groups=num_groups,
            top_groups=top_groups,
            router_jitter=router_jitter,
            expert_bias_update_rate=expert_bias_update_rate,
        )
        check_int("intermediate_dim", intermediate_dim, 1)
        for name, value in (
            ("capacity_factor", capacity_factor),
            ("eval_capacity_factor", eval_capacity_factor),
        ):
            if value is not None:
                check_positive(name, value)
        if group_size is not None:
            check_int("group_size", group_size, 1)
        check_int("shared_intermediate_dim", shared_intermediate_dim, 0)
        if shared_expert_gate and shared_intermediate_dim == 0:
            raise ValueError(
                "`shared_expert_gate=True` needs a shared expert: set "
                "`shared_intermediate_dim` >= 1. Received: shared_intermediate_dim=0"
            )
        check_non_negative("load_balance_loss_weight", load_balance_loss_weight)
        check_non_negative("router_z_loss_weight", router_z_loss_weight)
        check_rate("expert_dropout", expert_dropout)
        check_float_dtype("router_dtype", router_dtype)

        self.num_experts = num_experts
        self.intermediate_dim = intermediate_dim
        self.top_k = top_k
        self.activation = keras.activations.get(activation)
        self.gated = gated
        self.use_bias = use_bias
        self.score_func = score_func
        self.normalize_top_k = normalize_top_k
        self.routed_scaling_factor = routed_scaling_factor
        self.num_groups = num_groups
        self.top_groups = top_groups
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.group_size = group_size
        self.shared_intermediate_dim = shared_intermediate_dim
        self.shared_expert_gate = shared_expert_gate
        self.router_bias = router_bias
        self.router_jitter = router_jitter
        self.router_dtype = keras.backend.standardize_dtype(router_dtype)
        self.load_balance_loss_weight = load_balance_loss_weight
        self.router_z_loss_weight = router_z_loss_weight
        self.expert_bias_update_rate = expert_bias_update_rate
        self.expert_dropout = expert_dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.router_initializer = keras.initializers.get(router_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed = seed
        self.supports_masking = True

        self.router = TopKRouter(
            num_experts=num_experts,
            top_k=top_k,
            score_func=score_func,
            normalize_top_k=normalize_top_k,
            routed_scaling_factor=routed_scaling_factor,
            num_groups=num_groups,
            top_groups=top_groups,
            use_bias=router_bias,
            jitter=router_jitter,
            expert_bias_update_rate=expert_bias_update_rate,
            kernel_initializer=self.router_initializer,
            seed=seed,
            dtype=self.router_dtype,
            name="router",
        )
        self.experts = StackedExperts(
            num_experts=num_experts,
            intermediate_dim=intermediate_dim,
            activation=self.activation,
            gated=gated,
            use_bias=use_bias,
            dropout=expert_dropout,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            seed=seed,
            dtype=self.dtype_policy,
            name="experts",
        )
        self.shared_expert = None
        self.shared_gate = None
        if shared_intermediate_dim:
            self.shared_expert = FeedForward(
                intermediate_dim=shared_intermediate_dim,
                activation=self.activation,
                gated=gated,
                kernel_initializer=self.kernel_initializer,
                dtype=self.dtype_policy,
                name="shared_expert",
            )
            if shared_expert_gate:
                self.shared_gate = keras.layers.Dense(
                    1,
                    use_bias=False,
                    kernel_initializer=self.kernel_initializer,
                    dtype=self.dtype_policy,
                    name="shared_gate",
                )

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(
                f"{self.__class__.__name__} expects inputs of rank >= 2 "
                f"`(..., hidden)`. Received input_shape={input_shape}"
            )
        hidden = input_shape[-1]
        if hidden is None:
            raise ValueError(
                f"The last (hidden) dimension of the inputs to {self.__class__.__name__} "
                f"must be known. Received input_shape={input_shape}"
            )
        self.input_spec = keras.InputSpec(min_ndim=2, axes={-1: hidden})
        self.router.build((None, hidden))
        self.experts.build((None, hidden))
        if self.shared_expert is not None:
            self.shared_expert.build((None, hidden))
        if self.shared_gate is not None:
            self.shared_gate.build((None, hidden))
        # Routing statistics of the latest call, for callbacks and users.
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

    def _active_capacity_factor(self, training):
        if training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return self.eval_capacity_factor

    def call(self, inputs, training=None, mask=None, return_routing=False):
        input_shape = ops.shape(inputs)
        hidden = input_shape[-1]
        x = ops.reshape(inputs, (-1, hidden))  # (tokens, hidden)
        token_mask = None if mask is None else ops.reshape(ops.cast(mask, "bool"), (-1,))

        routing = self.router(x, token_mask=token_mask, training=training)
        indices = routing["expert_indices"]  # (tokens, k)
        weights = routing["expert_weights"]  # (tokens, k) float32
        if token_mask is None:
            valid = ops.ones_like(indices, dtype="bool")
        else:
            valid = ops.broadcast_to(ops.expand_dims(token_mask, -1), ops.shape(indices))

        capacity_factor = self._active_capacity_factor(training)
        if capacity_factor is None:
            outputs = dispatch.dispatch_dropless(
                x, indices, weights, valid, self.experts, training=training
            )
            dispatched = valid
        else:
            outputs, dispatched = self._dispatch_in_groups(
                x, indices, weights, valid, capacity_factor, training
            )

        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_gate is not None:
                shared = shared * ops.sigmoid(self.shared_gate(x))
            outputs = outputs + shared
        if token_mask is not None:
            outputs = ops.where(ops.expand_dims(token_mask, -1), outputs, ops.zeros((), outputs.dtype))

        if training:
            self._add_losses(routing, token_mask)
        self._record_statistics(indices, valid, dispatched)

        outputs = ops.reshape(outputs, input_shape)
        if not return_routing:
            return outputs
        lead = tuple(input_shape[:-1])
        return outputs, {
            "router_logits": ops.reshape(routing["router_logits"], lead + (self.num_experts,)),
            "expert_indices": ops.reshape(indices, lead + (self.top_k,)),
            "expert_weights": ops.reshape(weights, lead + (self.top_k,)),
            "dispatched": ops.reshape(dispatched, lead + (self.top_k,)),
        }

    def _dispatch_in_groups(self, x, indices, weights, valid, capacity_factor, training):
        """Capacity dispatch over routing groups of `group_size` tokens."""
        tokens, hidden = ops.shape(x)
        group_size = self.group_size or tokens
        if self.group_size is not None:
            # Pad the tokens to whole groups with invalid (unrouted) tokens.
            pad = (-tokens) % group_size
            x = ops.concatenate([x, ops.zeros((pad, hidden), x.dtype)], axis=0)
            indices = ops.concatenate([indices, ops.zeros((pad, self.top_k), indices.dtype)], axis=0)
            weights = ops.concatenate([weights, ops.zeros((pad, self.top_k), weights.dtype)], axis=0)
            valid = ops.concatenate([valid, ops.zeros((pad, self.top_k), "bool")], axis=0)

        def grouped(t):
            return ops.reshape(t, (-1, group_size) + tuple(ops.shape(t)[1:]))

        capacity = dispatch.compute_capacity(capacity_factor, group_size, self.top_k, self.num_experts)
        outputs, dispatched = dispatch.dispatch_with_capacity(
            grouped(x),
            grouped(indices),
            grouped(weights),
            grouped(valid),
            self.experts,
            capacity,
            training=training,
        )
        outputs = ops.reshape(outputs, (-1, hidden))[:tokens]
        dispatched = ops.reshape(dispatched, (-1, self.top_k))[:tokens]
        return outputs, dispatched

    def _add_losses(self, routing, token_mask):
        if self.load_balance_loss_weight > 0:
            self.add_loss(
                self.load_balance_loss_weight
                * losses.load_balancing_loss(
                    routing["router_probs"], routing["expert_indices"], mask=token_mask
                )
            )
        if self.router_z_loss_weight > 0:
            self.add_loss(
                self.router_z_loss_weight
                * losses.router_z_loss(routing["router_logits"], mask=token_mask)
            )

    def _record_statistics(self, indices, valid, dispatched):
        served = ops.one_hot(indices, self.num_experts, dtype="float32") * ops.expand_dims(
            ops.cast(dispatched, "float32"), -1
        )
        self.expert_counts.assign(ops.sum(served, axis=(0, 1)))
        dropped = ops.logical_and(valid, ops.logical_not(dispatched))
        self.dropped_count.assign(ops.sum(ops.cast(dropped, "float32")))

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs, training=None, mask=None, return_routing=False):
        outputs = keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)
        if not return_routing:
            return outputs
        lead = tuple(inputs.shape[:-1])
        return outputs, {
            "router_logits": keras.KerasTensor(lead + (self.num_experts,), dtype="float32"),
            "expert_indices": keras.KerasTensor(lead + (self.top_k,), dtype="int32"),
            "expert_weights": keras.KerasTensor(lead + (self.top_k,), dtype="float32"),
            "dispatched": keras.KerasTensor(lead + (self.top_k,), dtype="bool"),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "intermediate_dim": self.intermediate_dim,
                "top_k": self.top_k,
                "activation": keras.activations.serialize(self.activation),
                "gated": self.gated,
                "use_bias": self.use_bias,
                "score_func": self.score_func,
                "normalize_top_k": self.normalize_top_k,
                "routed_scaling_factor": self.routed_scaling_factor,
                "num_groups": self.num_groups,
                "top_groups": self.top_groups,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "group_size": self.group_size,
                "shared_intermediate_dim": self.shared_intermediate_dim,
                "shared_expert_gate": self.shared_expert_gate,
                "router_bias": self.router_bias,
                "router_jitter": self.router_jitter,
                "router_dtype": self.router_dtype,
                "load_balance_loss_weight": self.load_balance_loss_weight,
                "router_z_loss_weight": self.router_z_loss_weight,
                "expert_bias_update_rate": self.expert_bias_update_rate,
                "expert_dropout": self.expert_dropout,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "router_initializer": keras.initializers.serialize(self.router_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "seed": self.seed,
            }
        )
        return config
