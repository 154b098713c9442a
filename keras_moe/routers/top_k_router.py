"""Token-choice top-k router: logits -> scores -> selection -> weights."""

import keras
from keras import ops

from keras_moe.validation import check_choice
from keras_moe.validation import check_int
from keras_moe.validation import check_non_negative
from keras_moe.validation import check_positive
from keras_moe.validation import check_rate

SCORE_FUNCS = ("softmax", "sigmoid")


@keras.saving.register_keras_serializable(package="keras_moe")
class TopKRouter(keras.layers.Layer):
    """Token-choice top-k router; it only decides, it moves no tokens.

    Computes, in `router_dtype` (float32 by default, also under mixed
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
    loss free balancing), counting only real (unmasked) tokens.

    Args:
        num_experts: int, number of experts `E`.
        top_k: int, experts chosen per token, in `[1, E]`.
        score_func: `"softmax"` or `"sigmoid"`.
        normalize_top_k: bool, renormalize the `k` chosen scores to sum 1.
        routed_scaling_factor: float > 0 multiplying the weights.
        num_groups: int dividing `E`, expert groups for group-limited routing.
        top_groups: int in `[1, num_groups]` or `None` (= `num_groups`).
        use_bias: bool, add a trainable bias to the logits.
        jitter: float in `[0, 1)`, multiplicative input noise in training.
        expert_bias_update_rate: float >= 0, aux-loss-free balancing rate.
        kernel_initializer: initializer of the `(hidden, E)` kernel.
        seed: optional int seed of the jitter noise.

    Examples:
        >>> import numpy as np
        >>> router = TopKRouter(num_experts=4, top_k=2)
        >>> plan = router(np.random.rand(6, 8).astype("float32"))
        >>> tuple(plan["expert_indices"].shape)
        (6, 2)

    References:
        - [Shazeer et al., 2017](https://arxiv.org/abs/1701.06538)
        - [Fedus et al., 2021](https://arxiv.org/abs/2101.03961)
        - [DeepSeek-AI, 2024](https://arxiv.org/abs/2412.19437) (groups,
          sigmoid scores, aux-loss-free bias)
    """

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
        kernel_initializer="glorot_uniform",
        seed=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        validate_routing_args(
            num_experts=num_experts,
            top_k=top_k,
            score_func=score_func,
            routed_scaling_factor=routed_scaling_factor,
            num_groups=num_groups,
            top_groups=top_groups,
            router_jitter=jitter,
            expert_bias_update_rate=expert_bias_update_rate,
        )
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.normalize_top_k = normalize_top_k
        self.routed_scaling_factor = routed_scaling_factor
        self.num_groups = num_groups
        self.top_groups = num_groups if top_groups is None else top_groups
        self.use_bias = use_bias
        self.jitter = jitter
        self.expert_bias_update_rate = expert_bias_update_rate
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        hidden = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel",
            shape=(hidden, self.num_experts),
            initializer=self.kernel_initializer,
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.num_experts,), initializer="zeros"
            )
        else:
            self.bias = None
        self.expert_bias = self.add_weight(
            name="expert_bias",
            shape=(self.num_experts,),
            initializer="zeros",
            trainable=False,
        )

    def call(self, inputs, token_mask=None, training=None):
        """Routes `inputs (tokens, hidden)`.

        Returns a dict: `router_logits (tokens, E)`, `router_probs (tokens,
        E)`, `expert_indices (tokens, k)` int32 best first and
        `expert_weights (tokens, k)`, all float32 but the indices.
        """
        x = ops.cast(inputs, self.compute_dtype)
        if training and self.jitter > 0:
            x = x * keras.random.uniform(
                ops.shape(x),
                minval=1.0 - self.jitter,
                maxval=1.0 + self.jitter,
                dtype=self.compute_dtype,
                seed=self.seed_generator,
            )
        logits = ops.matmul(x, self.kernel)  # (tokens, E)
        if self.bias is not None:
            logits = logits + self.bias
        if self.score_func == "softmax":
            scores = ops.softmax(logits, axis=-1)
        else:
            scores = ops.sigmoid(logits)
        expert_indices = self._select(scores + self.expert_bias)  # (tokens, k)
        weights = ops.take_along_axis(scores, expert_indices, axis=-1)
        if self.normalize_top_k:
            weights = weights / (ops.sum(weights, axis=-1, keepdims=True) + 1e-20)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        if training and self.expert_bias_update_rate > 0:
            self._update_expert_bias(expert_indices, token_mask)
        return {
            "router_logits": logits,
            "router_probs": scores,
            "expert_indices": expert_indices,
            "expert_weights": weights,
        }

    def _select(self, biased_scores):
        """Top-k experts `(tokens, k)` int32 by biased score, group-limited."""
        if self.num_groups > 1:
            per_group = self.num_experts // self.num_groups
            grouped = ops.reshape(biased_scores, (-1, self.num_groups, per_group))
            best_two, _ = ops.top_k(grouped, min(2, per_group))
            group_scores = ops.sum(best_two, axis=-1)  # (tokens, groups)
            _, kept_groups = ops.top_k(group_scores, self.top_groups)
            kept = ops.sum(
                ops.one_hot(kept_groups, self.num_groups, dtype="float32"), axis=1
            )  # (tokens, groups), 1.0 where the group may be chosen
            kept = ops.repeat(kept, per_group, axis=-1)  # (tokens, E)
            # -inf, not 0: biased sigmoid scores can be negative, and an
            # excluded group must never win against an allowed expert.
            biased_scores = ops.where(kept > 0, biased_scores, float("-inf"))
        _, expert_indices = ops.top_k(biased_scores, self.top_k)
        return ops.cast(expert_indices, "int32")

    def _update_expert_bias(self, expert_indices, token_mask):
        assignments = ops.one_hot(expert_indices, self.num_experts, dtype="float32")
        if token_mask is not None:
            valid = ops.cast(ops.reshape(token_mask, (-1, 1, 1)), "float32")
            assignments = assignments * valid
        load = ops.sum(assignments, axis=(0, 1))  # (E,)
        step = self.expert_bias_update_rate * ops.sign(ops.mean(load) - load)
        self.expert_bias.assign(self.expert_bias + ops.cast(step, self.expert_bias.dtype))

    def compute_output_shape(self, input_shape):
        tokens = input_shape[0]
        return {
            "router_logits": (tokens, self.num_experts),
            "router_probs": (tokens, self.num_experts),
            "expert_indices": (tokens, self.top_k),
            "expert_weights": (tokens, self.top_k),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "score_func": self.score_func,
                "normalize_top_k": self.normalize_top_k,
                "routed_scaling_factor": self.routed_scaling_factor,
                "num_groups": self.num_groups,
                "top_groups": self.top_groups,
                "use_bias": self.use_bias,
                "jitter": self.jitter,
                "expert_bias_update_rate": self.expert_bias_update_rate,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "seed": self.seed,
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
    router_jitter,
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
    check_rate("router_jitter", router_jitter)
    check_non_negative("expert_bias_update_rate", expert_bias_update_rate)
