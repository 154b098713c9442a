"""ExpertChoiceMoE: experts choose their tokens (Zhou et al., 2022)."""

import keras

from keras_moe.layers.moe import MoE
from keras_moe.layers.sparse_moe import feed_forward_config
from keras_moe.layers.sparse_moe import feed_forward_parts
from keras_moe.routers import ExpertChoiceRouter
from keras_moe.validation import check_float_dtype
from keras_moe.validation import renamed_arguments


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertChoiceMoE(MoE):
    """Expert Choice mixture-of-experts feed-forward layer.

    Instead of each token choosing its experts, each expert chooses its
    tokens: within a routing group of `S` tokens (`group_size` tokens, or
    all tokens of the call), with `probs = softmax(x @ router.kernel)` over
    the experts, expert `e` takes the `C = ceil(S * capacity_factor / E)`
    tokens with the highest `probs[:, e]` (`ExpertChoiceRouter`). A token's
    output is `sum_e probs[t, e] * expert_e(x_t)` over the experts that chose
    it: 0 to `E` of them, `capacity_factor` on average. Every expert is
    exactly full, so there is no overflow and no load-balancing loss; the
    experts run on `(groups, E, C, hidden)` buffers the router's slots name
    (`keras_moe.dispatch.dispatch_to_slots`).

    **Not causal**: an expert's choice depends on every token of the group,
    later positions included (and on other sequences when a group spans the
    batch, as with `group_size=None`). Use it in encoders; the router warns
    once.

    Masked tokens are never chosen and output zeros; tokens with non-finite
    router logits are never chosen and output NaN (`nonfinite_count`). The
    experts, shared expert and their arguments are those of `SparseMoE`.

    Args:
        num_experts: int >= 1, the number of experts `E`.
        intermediate_dim: int >= 1, the hidden width of each expert.
        capacity_factor: float > 0, average experts per token in training.
            Defaults to 2.0 (the paper's EC-CF2).
        eval_capacity_factor: float > 0 or `None` (same as
            `capacity_factor`), used when not training. Defaults to `None`.
        group_size: int >= 1 or `None` (all tokens of the call form one
            group): tokens among which the experts choose. Defaults to
            `None`.
        activation: expert activation. Defaults to `"gelu"`.
        gated: bool, GLU experts. Defaults to `False`.
        use_bias: bool, biases in the experts. Defaults to `False`.
        shared_intermediate_dim: int >= 0; `> 0` adds an always-on shared
            expert FFN of that width. Defaults to 0.
        shared_expert_gate: bool, scale the shared expert's output by
            `sigmoid(x @ shared_gate.kernel)`. Defaults to `False`.
        router_bias: bool, a trainable bias on the router logits.
            Defaults to `False`.
        router_jitter: float in `[0, 1)`, multiplicative noise on the router
            input in training. Defaults to 0.0.
        router_dtype: dtype of the router's variables and math.
            Defaults to `"float32"`.
        router_z_loss_weight: float >= 0. Defaults to 0.0.
        expert_dropout: float in `[0, 1)`, dropout on the experts' hidden
            activations in training. Defaults to 0.0.
        kernel_initializer: initializer of the expert kernels.
            Defaults to `"glorot_uniform"`.
        router_initializer: initializer of the router kernel.
            Defaults to `"glorot_uniform"`.
        bias_initializer: initializer of the expert biases.
            Defaults to `"zeros"`.
        seed: optional int seed for jitter and dropout noise.
        **kwargs: standard layer arguments (`name`, `dtype`, ...).

    Call arguments:
        - `inputs`: `(..., hidden)` tensor, rank >= 2.
        - `training`: bool, training mode.
        - `mask`: optional bool `(...)`, `False` for padding tokens.
        - `return_routing`: bool; if `True` returns `(outputs, routing)`
          with `routing` a dict of `router_logits (..., E)`,
          `expert_indices (..., E)` (every expert, by decreasing
          probability), `expert_weights (..., E)` and `dispatched (..., E)`
          (whether that expert chose the token).

    Examples:
        >>> import numpy as np
        >>> import keras_moe
        >>> layer = keras_moe.layers.ExpertChoiceMoE(
        ...     num_experts=4, intermediate_dim=32, capacity_factor=2.0)
        >>> tuple(layer(np.zeros((2, 8, 16), "float32")).shape)
        (2, 8, 16)

    References:
        - [Zhou et al., 2022](https://arxiv.org/abs/2202.09368)
        - flaxformer's `moe/routing.py` (`ExpertsChooseMaskedRouter`).
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        capacity_factor=2.0,
        eval_capacity_factor=None,
        group_size=None,
        activation="gelu",
        gated=False,
        use_bias=False,
        shared_intermediate_dim=0,
        shared_expert_gate=False,
        router_bias=False,
        router_jitter=0.0,
        router_dtype="float32",
        router_z_loss_weight=0.0,
        expert_dropout=0.0,
        kernel_initializer="glorot_uniform",
        router_initializer="glorot_uniform",
        bias_initializer="zeros",
        seed=None,
        **kwargs,
    ):
        with renamed_arguments(
            use_bias="router_bias",
            jitter="router_jitter",
            z_loss_weight="router_z_loss_weight",
        ):
            router = ExpertChoiceRouter(
                num_experts=num_experts,
                capacity_factor=capacity_factor,
                eval_capacity_factor=eval_capacity_factor,
                use_bias=router_bias,
                jitter=router_jitter,
                z_loss_weight=router_z_loss_weight,
                kernel_initializer=router_initializer,
                seed=seed,
                dtype=check_float_dtype("router_dtype", router_dtype),
                name="router",
            )
        experts, shared_expert, shared_gate = feed_forward_parts(
            num_experts=num_experts,
            intermediate_dim=intermediate_dim,
            activation=activation,
            gated=gated,
            use_bias=use_bias,
            expert_dropout=expert_dropout,
            shared_intermediate_dim=shared_intermediate_dim,
            shared_expert_gate=shared_expert_gate,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            seed=seed,
            dtype=kwargs.get("dtype"),
        )
        # The router holds the capacity factors: it picks the slots.
        super().__init__(
            router=router,
            experts=experts,
            group_size=group_size,
            shared_expert=shared_expert,
            shared_gate=shared_gate,
            **kwargs,
        )
        self.seed = seed

    def get_config(self):
        # Flat, as the constructor takes them (not MoE's nested router/experts).
        config = keras.layers.Layer.get_config(self)
        router = self.router
        config.update(
            {
                "num_experts": self.num_experts,
                "capacity_factor": router.capacity_factor,
                "eval_capacity_factor": router.eval_capacity_factor,
                "group_size": self.group_size,
                "router_bias": router.use_bias,
                "router_jitter": router.jitter,
                "router_dtype": router.dtype_policy.name,
                "router_z_loss_weight": router.initial_loss_weights["z"],
                "router_initializer": keras.initializers.serialize(router.kernel_initializer),
                "seed": self.seed,
                **feed_forward_config(self),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
