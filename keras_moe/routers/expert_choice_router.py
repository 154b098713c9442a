"""Expert Choice routing (Zhou et al., 2022): each expert picks its tokens."""

import math
import warnings

import keras
from keras import ops

from keras_moe import losses
from keras_moe.routers.base import LazyLosses
from keras_moe.routers.base import Router
from keras_moe.routers.base import RoutingPlan
from keras_moe.validation import check_positive


def expert_choice_capacity(capacity_factor, group_tokens, num_experts):
    """Tokens each expert takes per group: `min(S, ceil(S * cf / E))`, at least 1.

    A Python int when `group_tokens` (`S`) is known while tracing, else an
    int32 tensor.
    """
    if isinstance(group_tokens, int):
        return max(1, min(group_tokens, math.ceil(group_tokens * capacity_factor / num_experts)))
    slots = ops.ceil(ops.cast(group_tokens, "float32") * (capacity_factor / num_experts))
    return ops.maximum(ops.minimum(ops.cast(slots, "int32"), group_tokens), 1)


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertChoiceRouter(Router):
    """Expert Choice routing: each expert chooses its top-`C` tokens.

    Token-choice routers let each token pick experts, so experts overflow or
    idle. Here the experts choose: with `probs = softmax(logits)` over the
    experts for every token of a routing group of `S` tokens, expert `e`
    takes the `C = ceil(S * capacity_factor / E)` tokens (at most `S`) with
    the highest `probs[:, e]`, and a chosen token's output from `e` is
    weighted by `probs[t, e]`. Every expert does the same work and nothing
    overflows; a token may be chosen by 0 to `E` experts (the capacity
    factor is the average number of experts per token). Masked and
    unroutable tokens are never chosen; with fewer routable tokens than `C`
    an expert takes them all.

    The plan has `k = E` assignments per token, one per expert, ordered by
    decreasing probability; `dispatch_mask` marks the ones the expert chose,
    and `slots` names their buffer slots (`e * C + rank`), which the layer
    uses as they are (`names_slots = True`). No auxiliary loss is needed for
    balance; an optional router z-loss is available.

    **Not causal.** Which tokens an expert takes depends on every token of
    the group, later positions included, and on the other sequences when a
    group spans the batch. Use it in encoders (or set `group_size` to keep
    the choice within a sequence); in an autoregressive decoder it leaks the
    future and does not match at inference. The router warns once when
    built.

    Args:
        num_experts: int >= 1, number of experts `E`.
        capacity_factor: float > 0, average experts per token in training.
            Defaults to 2.0 (the paper's EC-CF2).
        eval_capacity_factor: float > 0 or `None` (same as
            `capacity_factor`) when not training. Defaults to `None`.
        use_bias: bool, a trainable bias on the logits. Defaults to `False`.
        jitter: float in `[0, 1)`, multiplicative input noise in training.
            Defaults to 0.
        z_loss_weight: float >= 0, weight of the router z-loss. Defaults to 0.
        kernel_initializer: initializer of the `(hidden, E)` kernel.
        seed: optional int seed of the jitter noise.

    Examples:
        >>> import numpy as np
        >>> router = ExpertChoiceRouter(num_experts=4, capacity_factor=2.0)
        >>> plan = router(np.random.rand(1, 8, 16).astype("float32"))
        >>> plan.capacity, tuple(plan.slots.shape)
        (4, (1, 8, 4))

    References:
        - [Zhou et al., 2022](https://arxiv.org/abs/2202.09368)
        - flaxformer's `moe/routing.py` (`ExpertsChooseMaskedRouter`).
    """

    loss_names = ("z",)
    names_slots = True
    #: One warning per process about Expert Choice not being causal.
    _warned_not_causal = False

    def __init__(
        self,
        num_experts,
        capacity_factor=2.0,
        eval_capacity_factor=None,
        use_bias=False,
        jitter=0.0,
        z_loss_weight=0.0,
        kernel_initializer="glorot_uniform",
        seed=None,
        **kwargs,
    ):
        super().__init__(
            num_experts=num_experts,
            use_bias=use_bias,
            jitter=jitter,
            loss_weights={"z": z_loss_weight},
            kernel_initializer=kernel_initializer,
            seed=seed,
            **kwargs,
        )
        self.capacity_factor = check_positive("capacity_factor", capacity_factor)
        self.eval_capacity_factor = None
        if eval_capacity_factor is not None:
            self.eval_capacity_factor = check_positive("eval_capacity_factor", eval_capacity_factor)

    @property
    def num_selected(self):
        return self.num_experts

    def build_state(self, input_shape):
        if not ExpertChoiceRouter._warned_not_causal:
            ExpertChoiceRouter._warned_not_causal = True
            warnings.warn(
                "Expert Choice routing is not causal: an expert's choice of tokens depends on "
                "every token of the routing group, later ones included. Use it in encoders, "
                "not in autoregressive decoders.",
                UserWarning,
                stacklevel=2,
            )

    def active_capacity_factor(self, training):
        if training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return self.eval_capacity_factor

    def compute_routing(self, inputs, logits, routed, training):
        groups, tokens = ops.shape(logits)[0], ops.shape(logits)[1]
        num_experts = self.num_experts
        if num_experts == 1:
            probs = ops.ones_like(logits)  # softmax over one expert
        else:
            probs = ops.softmax(logits, axis=-1)  # (G, S, E)
        capacity = expert_choice_capacity(self.active_capacity_factor(training), tokens, num_experts)
        # Each expert ranks the group's tokens; unroutable ones (whose
        # probabilities may be NaN) rank last. A double argsort turns the
        # order into ranks, a permutation, so slots never collide.
        keys = ops.where(ops.expand_dims(routed, -1), probs, -1.0)
        keys = ops.transpose(keys, (0, 2, 1))  # (G, E, S)
        order = ops.argsort(-keys, axis=-1)
        rank = ops.cast(ops.argsort(order, axis=-1), "int32")
        rank = ops.transpose(rank, (0, 2, 1))  # (G, S, E)
        chosen = ops.logical_and(rank < capacity, ops.expand_dims(routed, -1))
        experts = ops.arange(num_experts, dtype="int32")
        slots = ops.where(chosen, experts * capacity + rank, num_experts * capacity)
        weights = ops.where(ops.expand_dims(routed, -1), probs, 0.0)
        # Per token, its E assignments best first (as token-choice plans).
        by_prob = ops.cast(ops.argsort(-weights, axis=-1), "int32")
        take = lambda t: ops.take_along_axis(t, by_prob, axis=-1)  # noqa: E731
        aux_losses = {}
        if training:  # read after the experts are issued (see `LazyLosses`)
            aux_losses = LazyLosses({"z": lambda: losses.router_z_loss(logits, mask=routed)})
        return RoutingPlan(
            expert_indices=by_prob,
            expert_weights=take(weights),
            dispatch_mask=take(chosen),
            router_logits=logits,
            router_probs=probs,
            slots=ops.cast(take(slots), "int32"),
            capacity=capacity,
            routed=routed,
            aux_losses=aux_losses,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "z_loss_weight": self.initial_loss_weights["z"],
            }
        )
        return config
