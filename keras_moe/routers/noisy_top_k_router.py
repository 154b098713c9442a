"""Noisy top-k gating (Shazeer et al., 2017): trainable noise on the logits."""

import keras
from keras import ops

from keras_moe import losses
from keras_moe.routers.base import LazyLosses
from keras_moe.routers.top_k_router import TopKRouter
from keras_moe.validation import check_non_negative


@keras.saving.register_keras_serializable(package="keras_moe")
class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating: the router of the Sparsely-Gated MoE layer.

    In training, Gaussian noise with a learned, per-token and per-expert
    scale is added to the logits before the top `k` are chosen:

    `H(x) = x @ kernel + N(0, 1) * (softplus(x @ noise_kernel) + noise_epsilon)`

    and the weights are a softmax over the `k` kept noisy logits (a
    `TopKRouter` with softmax scores and `normalize_top_k=True`). Not in
    training the noise is off and the router is a plain top-k softmax
    router. The noise lets the gradient of the load loss reach experts a
    token did not choose, which is what balances them:

    - `importance_loss(gates)`: `cv_squared` of each expert's total gate
      value over the tokens;
    - `load_loss(...)`: `cv_squared` of each expert's smooth load, the sum
      over tokens of the normal-CDF probability that it stays in the top
      `k` under new noise (tensor2tensor's `_prob_in_top_k`).

    Both are added in training with their weights (1e-2 each, as in the
    paper's experiments), besides `TopKRouter`'s load-balancing and z losses
    (both 0 by default here). `noise_epsilon` (1e-2, as in tensor2tensor)
    keeps the noise scale, and so the load estimate, away from 0.

    The returned plan's `router_logits` are the logits the router selected
    on: noisy in training. `noise_kernel` is zero-initialized as in the
    paper, so training starts with noise of scale `softplus(0) + 0.01`.
    Everything else is as in `TopKRouter`; its group-limited selection,
    sigmoid scores and expert-bias updates are refused, since the load
    estimate assumes a plain top `k` of the noisy logits.

    Args:
        num_experts: int >= 1, number of experts `E`.
        top_k: int in `[1, E]`. Defaults to 2.
        noise_epsilon: float >= 0 added to the noise scale. Defaults to 1e-2.
        importance_loss_weight: float >= 0. Defaults to 1e-2.
        load_loss_weight: float >= 0. Defaults to 1e-2.
        load_balance_loss_weight: float >= 0, the Switch loss. Defaults to 0.
        noise_initializer: initializer of the `(hidden, E)` noise kernel.
            Defaults to `"zeros"`.
        **kwargs: other `TopKRouter` arguments (`use_bias`, `jitter`,
            `normalize_top_k`, `batch_prioritized_routing`,
            `second_expert_policy`, `z_loss_weight`, `kernel_initializer`,
            `seed`, ...) and layer arguments.

    Examples:
        >>> import numpy as np
        >>> router = NoisyTopKRouter(num_experts=4, top_k=2)
        >>> plan = router(np.random.rand(1, 6, 8).astype("float32"), training=True)
        >>> sorted(plan.aux_losses)
        ['importance', 'load', 'load_balance', 'z']

    References:
        - [Shazeer et al., 2017](https://arxiv.org/abs/1701.06538),
          section 2.1 and appendix A.
        - tensor2tensor's `utils/expert_utils.py` (`noisy_top_k_gating`,
          `cv_squared`, `_prob_in_top_k`).
    """

    loss_names = ("load_balance", "z", "importance", "load")

    def __init__(
        self,
        num_experts,
        top_k=2,
        noise_epsilon=1e-2,
        importance_loss_weight=1e-2,
        load_loss_weight=1e-2,
        load_balance_loss_weight=0.0,
        noise_initializer="zeros",
        **kwargs,
    ):
        for name, allowed in (
            ("score_func", ("softmax",)),
            ("num_groups", (1,)),
            ("top_groups", (None, 1)),
            ("expert_bias_update_rate", (0.0,)),
        ):
            if name in kwargs and kwargs[name] not in allowed:
                raise ValueError(
                    f"Noisy top-k gating selects the plain top `k` of the noisy logits, so "
                    f"`{name}` must be {allowed[-1]!r}. Received: {name}={kwargs[name]!r}"
                )
        super().__init__(
            num_experts=num_experts,
            top_k=top_k,
            load_balance_loss_weight=load_balance_loss_weight,
            **kwargs,
        )
        self.noise_epsilon = check_non_negative("noise_epsilon", noise_epsilon)
        self.initial_loss_weights["importance"] = check_non_negative(
            "importance_loss_weight", importance_loss_weight
        )
        self.initial_loss_weights["load"] = check_non_negative("load_loss_weight", load_loss_weight)
        self.noise_initializer = keras.initializers.get(noise_initializer)

    def build_state(self, input_shape):
        super().build_state(input_shape)
        self.noise_kernel = self.add_weight(
            name="noise_kernel",
            shape=(input_shape[-1], self.num_experts),
            initializer=self.noise_initializer,
        )

    def compute_routing(self, inputs, logits, routed, training):
        if not training:
            return super().compute_routing(inputs, logits, routed, training)
        noise_stddev = ops.softplus(ops.matmul(inputs, self.noise_kernel)) + self.noise_epsilon
        noise = keras.random.normal(ops.shape(logits), dtype=logits.dtype, seed=self.seed_generator)
        noisy_logits = logits + noise * noise_stddev  # (G, S, E)
        plan = super().compute_routing(inputs, noisy_logits, routed, training)

        def importance():
            # Dense gates (G, S, E): each token's weights at its chosen experts.
            gates = ops.sum(
                ops.one_hot(plan.expert_indices, self.num_experts, dtype=plan.expert_weights.dtype)
                * ops.expand_dims(plan.expert_weights, -1),
                axis=-2,
            )
            return losses.importance_loss(gates, mask=routed)

        aux_losses = plan.aux_losses
        if not isinstance(aux_losses, LazyLosses):
            aux_losses = LazyLosses(aux_losses or {})
        aux_losses = aux_losses.with_losses(
            {
                "importance": importance,
                "load": lambda: losses.load_loss(
                    logits, noisy_logits, noise_stddev, self.top_k, mask=routed
                ),
            }
        )
        return plan._replace(aux_losses=aux_losses)

    def get_config(self):
        config = super().get_config()
        for name in ("score_func", "num_groups", "top_groups", "expert_bias_update_rate"):
            config.pop(name)
        config.update(
            {
                "noise_epsilon": self.noise_epsilon,
                "importance_loss_weight": self.initial_loss_weights["importance"],
                "load_loss_weight": self.initial_loss_weights["load"],
                "noise_initializer": keras.initializers.serialize(self.noise_initializer),
            }
        )
        return config
