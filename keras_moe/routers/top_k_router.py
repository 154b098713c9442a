"""Token-choice top-k router: logits -> scores -> selection -> weights."""

import keras
from keras import ops

from keras_moe import backend as fast
from keras_moe import losses
from keras_moe.routers.base import LazyLosses
from keras_moe.routers.base import Router
from keras_moe.routers.base import RoutingPlan
from keras_moe.validation import check_choice
from keras_moe.validation import check_int
from keras_moe.validation import check_non_negative
from keras_moe.validation import check_positive

SCORE_FUNCS = ("softmax", "sigmoid")
SECOND_EXPERT_POLICIES = ("all", "random", "sampling")


@keras.saving.register_keras_serializable(package="keras_moe")
class TopKRouter(Router):
    """Token-choice top-k router; it only decides, it moves no tokens.

    Computes, in the router's dtype (float32 by default, also under mixed
    precision):

    1. `logits = x @ kernel (+ bias)`; in training with `jitter > 0` the input
       is first multiplied by `uniform(1 - jitter, 1 + jitter)`.
    2. `scores = softmax(logits)` or `sigmoid(logits)`.
    3. Selection on `scores + expert_bias`: with `num_groups > 1` the experts
       are split into equal contiguous groups, a group scores the sum of its
       two best biased scores, and only experts of the `top_groups` best
       groups can be chosen; then the `top_k` best experts, best first.
    4. `weights = scores` at the chosen experts (the bias never enters the
       weights), renormalized to sum 1 if `normalize_top_k`, then times
       `routed_scaling_factor`.

    With `expert_bias_update_rate = u > 0`, every training call moves the
    non-trainable `expert_bias` by `u * sign(mean_load - load_e)` (auxiliary
    loss free balancing), counting only routed (unmasked) tokens. With
    `batch_prioritized_routing=True` the plan asks the layer to serve
    capacity to the most confident tokens first (V-MoE): a token's priority
    is its best expert's score. In training the router adds
    `load_balance_loss_weight * load_balancing_loss` and
    `z_loss_weight * router_z_loss`.

    GShard's second-expert policies (`top_k=2` only) decide what happens to
    each token's second expert after the two weights are computed (and
    renormalized, as in Mesh TensorFlow and praxis' default "legacy"
    behaviour): `"all"` keeps it; `"random"` keeps it with probability
    `min(1, w_2 / second_expert_threshold)` and otherwise marks it not to
    dispatch (its weight is not moved to the first expert); `"sampling"`
    draws the second expert from the scores of the experts other than the
    first, `P(e) = s_e / sum_{e' != first} s_e'` (the Gumbel-max trick), and
    its weight is computed from its score like a greedy choice. The policy
    applies in training and, unless `eval_second_expert_policy` says
    otherwise, in inference (both references do). The noise comes from the
    router's `SeedGenerator`: the same `seed` gives the same routing.

    Args:
        num_experts: int >= 1, number of experts `E`.
        top_k: int in `[1, E]`, experts chosen per token. Defaults to 2.
        score_func: `"softmax"` or `"sigmoid"`. Defaults to `"softmax"`.
        normalize_top_k: bool, renormalize the `k` chosen scores to sum 1.
            Defaults to `True`.
        routed_scaling_factor: float > 0 multiplying the weights.
            Defaults to 1.0.
        num_groups: int dividing `E`, expert groups for group-limited
            routing. Defaults to 1.
        top_groups: int in `[1, num_groups]` or `None` (= `num_groups`).
        use_bias: bool, add a trainable bias to the logits. Defaults to
            `False`.
        jitter: float in `[0, 1)`, multiplicative input noise in training.
            Defaults to 0.
        expert_bias_update_rate: float >= 0, aux-loss-free balancing rate.
            Defaults to 0.
        batch_prioritized_routing: bool, capacity in order of router
            confidence instead of token order. Defaults to `False`.
        second_expert_policy: `"all"`, `"random"` or `"sampling"`, GShard's
            policy for the second expert (`top_k=2` only). Defaults to
            `"all"`.
        second_expert_threshold: float > 0, the weight at and above which
            the `"random"` policy always keeps the second expert. Defaults
            to 0.2 (GShard).
        eval_second_expert_policy: the policy when not training, or `None`
            for `second_expert_policy`. Defaults to `None`.
        load_balance_loss_weight: float >= 0. Defaults to 1e-2.
        z_loss_weight: float >= 0, weight of the router z-loss. Defaults
            to 0.
        kernel_initializer: initializer of the `(hidden, E)` kernel.
        seed: optional int seed of the jitter noise and of the second-expert
            policies' randomness.

    Examples:
        >>> import numpy as np
        >>> router = TopKRouter(num_experts=4, top_k=2)
        >>> plan = router(np.random.rand(1, 6, 8).astype("float32"))
        >>> tuple(plan.expert_indices.shape)
        (1, 6, 2)

    References:
        - [Shazeer et al., 2017](https://arxiv.org/abs/1701.06538)
        - [Fedus et al., 2021](https://arxiv.org/abs/2101.03961)
        - [Riquelme et al., 2021 (V-MoE)](https://arxiv.org/abs/2106.05974)
          (batch-prioritized routing)
        - [Lepikhin et al., 2020 (GShard)](https://arxiv.org/abs/2006.16668)
          (second-expert policies; Mesh TensorFlow's `moe.py` and praxis'
          `gshard_utils.py`)
        - [DeepSeek-AI, 2024](https://arxiv.org/abs/2412.19437) (groups,
          sigmoid scores, aux-loss-free bias)
    """

    loss_names = ("load_balance", "z")

    def __init__(
        self,
        num_experts,
        top_k=2,
        score_func="softmax",
        normalize_top_k=True,
        routed_scaling_factor=1.0,
        num_groups=1,
        top_groups=None,
        use_bias=False,
        jitter=0.0,
        expert_bias_update_rate=0.0,
        batch_prioritized_routing=False,
        second_expert_policy="all",
        second_expert_threshold=0.2,
        eval_second_expert_policy=None,
        load_balance_loss_weight=1e-2,
        z_loss_weight=0.0,
        kernel_initializer="glorot_uniform",
        seed=None,
        **kwargs,
    ):
        super().__init__(
            num_experts=num_experts,
            use_bias=use_bias,
            jitter=jitter,
            loss_weights={"load_balance": load_balance_loss_weight, "z": z_loss_weight},
            kernel_initializer=kernel_initializer,
            seed=seed,
            **kwargs,
        )
        validate_routing_args(
            num_experts=num_experts,
            top_k=top_k,
            score_func=score_func,
            routed_scaling_factor=routed_scaling_factor,
            num_groups=num_groups,
            top_groups=top_groups,
            expert_bias_update_rate=expert_bias_update_rate,
        )
        validate_second_expert_args(
            top_k, second_expert_policy, second_expert_threshold, eval_second_expert_policy
        )
        self.top_k = int(top_k)
        self.score_func = score_func
        self.normalize_top_k = bool(normalize_top_k)
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.num_groups = int(num_groups)
        self.top_groups = self.num_groups if top_groups is None else int(top_groups)
        self.expert_bias_update_rate = float(expert_bias_update_rate)
        self.batch_prioritized_routing = bool(batch_prioritized_routing)
        self.second_expert_policy = second_expert_policy
        self.second_expert_threshold = float(second_expert_threshold)
        self.eval_second_expert_policy = eval_second_expert_policy

    @property
    def num_selected(self):
        return self.top_k

    def build_state(self, input_shape):
        self.expert_bias = self.add_weight(
            name="expert_bias",
            shape=(self.num_experts,),
            initializer="zeros",
            trainable=False,
        )

    def compute_routing(self, inputs, logits, routed, training):
        scores = self.scores(logits)
        policy = self.active_second_expert_policy(training)
        expert_indices, allowed = self._select(scores + self.expert_bias)  # (G, S, k)
        if policy == "sampling":
            expert_indices = self._sample_second_expert(scores, expert_indices, allowed, routed)
        weights = ops.take_along_axis(scores, expert_indices, axis=-1)
        if self.normalize_top_k:
            weights = weights / (ops.sum(weights, axis=-1, keepdims=True) + 1e-20)
        dispatch_mask = ops.broadcast_to(ops.expand_dims(routed, -1), ops.shape(expert_indices))
        if policy == "random":
            dispatch_mask = self._random_second_expert(weights, dispatch_mask)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        if training and self.expert_bias_update_rate > 0:
            self._update_expert_bias(expert_indices, routed)
        priority = None
        if self.batch_prioritized_routing:
            priority = ops.amax(scores, axis=-1)  # (G, S): confidence in the best expert
        aux_losses = {}
        if training:  # read after the experts are issued (see `LazyLosses`)
            aux_losses = LazyLosses(
                {
                    "load_balance": lambda: losses.load_balancing_loss(
                        scores, expert_indices, mask=routed
                    ),
                    "z": lambda: losses.router_z_loss(logits, mask=routed),
                }
            )
        return RoutingPlan(
            expert_indices=expert_indices,
            expert_weights=weights,
            dispatch_mask=dispatch_mask,
            router_logits=logits,
            router_probs=scores,
            priority=priority,
            routed=routed,
            aux_losses=aux_losses,
        )

    def scores(self, logits):
        """Softmax or sigmoid scores `(..., E)` of the logits."""
        if self.score_func == "sigmoid":
            return ops.sigmoid(logits)
        if self.num_experts == 1:
            # Softmax over one expert is 1 (Keras would warn on every call).
            return ops.ones_like(logits)
        return ops.softmax(logits, axis=-1)

    def active_second_expert_policy(self, training):
        """The second-expert policy of a training or inference call."""
        if training or self.eval_second_expert_policy is None:
            return self.second_expert_policy
        return self.eval_second_expert_policy

    def _sample_second_expert(self, scores, expert_indices, allowed, routed):
        """Replaces each token's second expert by one drawn from the others' scores."""
        log_scores = ops.log(ops.maximum(scores, 1e-30))
        # Padding and unroutable tokens may hold NaN; their draw is unused.
        log_scores = ops.where(ops.expand_dims(routed, -1), log_scores, 0.0)
        first = ops.one_hot(expert_indices[..., 0], self.num_experts) > 0  # (G, S, E)
        excluded = first if allowed is None else ops.logical_or(first, ops.logical_not(allowed))
        uniform = keras.random.uniform(
            ops.shape(scores), minval=1e-12, maxval=1.0, dtype="float32", seed=self.seed_generator
        )
        gumbel = -ops.log(-ops.log(uniform))
        # argmax of log-scores + Gumbel noise samples from the normalized scores.
        noisy = ops.where(excluded, float("-inf"), log_scores + gumbel)
        second = ops.cast(ops.argmax(noisy, axis=-1), "int32")  # (G, S)
        return ops.stack([expert_indices[..., 0], second], axis=-1)

    def _random_second_expert(self, weights, dispatch_mask):
        """Keeps each second expert with probability `min(1, w_2 / threshold)`."""
        uniform = keras.random.uniform(
            ops.shape(weights)[:-1], dtype="float32", seed=self.seed_generator
        )  # (G, S)
        keep = uniform < weights[..., 1] / self.second_expert_threshold
        return ops.stack(
            [dispatch_mask[..., 0], ops.logical_and(dispatch_mask[..., 1], keep)], axis=-1
        )

    def _select(self, biased_scores):
        """Top-k experts `(..., k)` int32 by biased score, group-limited.

        Returns the indices and the `(..., E)` bool mask of the experts the
        groups allow (`None` without groups).
        """
        allowed = None
        if self.num_groups > 1:
            per_group = self.num_experts // self.num_groups
            lead = tuple(ops.shape(biased_scores)[:-1])
            grouped = ops.reshape(biased_scores, lead + (self.num_groups, per_group))
            best_two, _ = ops.top_k(grouped, min(2, per_group))
            group_scores = ops.sum(best_two, axis=-1)  # (..., groups)
            _, kept_groups = ops.top_k(group_scores, self.top_groups)
            kept = ops.sum(
                ops.one_hot(kept_groups, self.num_groups, dtype="float32"), axis=-2
            )  # (..., groups), 1.0 where the group may be chosen
            allowed = ops.repeat(kept, per_group, axis=-1) > 0  # (..., E)
            # -inf, not 0: biased sigmoid scores can be negative, and an
            # excluded group must never win against an allowed expert.
            biased_scores = ops.where(
                allowed, biased_scores, fast.scalar_like(float("-inf"), biased_scores)
            )
        _, expert_indices = ops.top_k(biased_scores, self.top_k)
        return ops.cast(expert_indices, "int32"), allowed

    def _update_expert_bias(self, expert_indices, routed):
        # Assignments per expert over routed tokens: a count, no
        # (tokens, k, E) one-hot table.
        load = fast.count_ids(expert_indices, self.num_experts, where=ops.expand_dims(routed, -1))  # (E,)
        step = self.expert_bias_update_rate * ops.sign(ops.mean(load) - load)
        self.expert_bias.assign(self.expert_bias + ops.cast(step, self.expert_bias.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "top_k": self.top_k,
                "score_func": self.score_func,
                "normalize_top_k": self.normalize_top_k,
                "routed_scaling_factor": self.routed_scaling_factor,
                "num_groups": self.num_groups,
                "top_groups": self.top_groups,
                "expert_bias_update_rate": self.expert_bias_update_rate,
                "batch_prioritized_routing": self.batch_prioritized_routing,
                "second_expert_policy": self.second_expert_policy,
                "second_expert_threshold": self.second_expert_threshold,
                "eval_second_expert_policy": self.eval_second_expert_policy,
                "load_balance_loss_weight": self.initial_loss_weights["load_balance"],
                "z_loss_weight": self.initial_loss_weights["z"],
            }
        )
        return config


def validate_routing_args(
    num_experts,
    top_k,
    score_func,
    routed_scaling_factor,
    num_groups,
    top_groups,
    expert_bias_update_rate,
):
    """Raises `ValueError` naming the first invalid routing argument."""
    check_int("num_experts", num_experts, 1)
    check_int("top_k", top_k, 1, num_experts)
    check_choice("score_func", score_func, SCORE_FUNCS)
    check_positive("routed_scaling_factor", routed_scaling_factor)
    check_int("num_groups", num_groups, 1, num_experts)
    if num_experts % num_groups:
        raise ValueError(
            "`num_groups` must divide `num_experts` evenly. Received: "
            f"num_groups={num_groups}, num_experts={num_experts}"
        )
    if top_groups is not None:
        check_int("top_groups", top_groups, 1, num_groups)
        reachable = top_groups * (num_experts // num_groups)
        if top_k > reachable:
            raise ValueError(
                f"`top_k` must be at most top_groups * num_experts / num_groups = "
                f"{reachable}, the experts the kept groups hold. Received: top_k={top_k}"
            )
    check_non_negative("expert_bias_update_rate", expert_bias_update_rate)


def validate_second_expert_args(top_k, policy, threshold, eval_policy):
    """Raises `ValueError` naming the first invalid second-expert argument."""
    check_choice("second_expert_policy", policy, SECOND_EXPERT_POLICIES)
    if eval_policy is not None:
        check_choice("eval_second_expert_policy", eval_policy, SECOND_EXPERT_POLICIES)
    check_positive("second_expert_threshold", threshold)
    for name, value in (("second_expert_policy", policy), ("eval_second_expert_policy", eval_policy)):
        if value not in (None, "all") and top_k != 2:
            raise ValueError(
                f"`{name}={value!r}` is GShard's policy for the second of two experts: it "
                f"needs `top_k=2`. Received: top_k={top_k}"
            )
