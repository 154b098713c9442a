"""SwitchFFN: the Switch Transformer's top-1 expert layer."""

import keras

from keras_moe.layers.sparse_moe import SparseMoE


@keras.saving.register_keras_serializable(package="keras_moe")
class SwitchFFN(SparseMoE):
    """Switch Transformer feed-forward layer: top-1 routing with capacity.

    A configuration of `SparseMoE` with the Switch Transformer's defaults:
    each token goes to its single most probable expert, weighted by that
    expert's softmax probability (no renormalization); each expert takes at
    most `ceil(capacity_factor * group_tokens / num_experts)` tokens per
    routing group (1.25 in training, 2.0 in evaluation) and overflowing
    tokens are dropped (the residual connection carries them); the float32
    router input is jittered by `uniform(1 - 0.01, 1 + 0.01)` in training;
    load-balancing (1e-2) and router z (1e-3) losses are added; experts are
    ReLU MLPs with optional expert dropout.

    Args:
        num_experts: int >= 1.
        intermediate_dim: int >= 1, each expert's hidden width.
        capacity_factor: float > 0 or `None`. Defaults to 1.25.
        eval_capacity_factor: float > 0 or `None`. Defaults to 2.0.
        router_jitter: float in `[0, 1)`. Defaults to 0.01.
        load_balance_loss_weight: float >= 0. Defaults to 1e-2.
        router_z_loss_weight: float >= 0. Defaults to 1e-3.
        expert_dropout: float in `[0, 1)`. Defaults to 0.0.
        activation: expert activation. Defaults to `"relu"`.
        **kwargs: any other `SparseMoE` argument (`group_size`, `use_bias`,
            `gated`, ...) and standard layer arguments.

    Examples:
        >>> import numpy as np
        >>> layer = SwitchFFN(num_experts=4, intermediate_dim=64)
        >>> tuple(layer(np.zeros((2, 8, 32), "float32")).shape)
        (2, 8, 32)

    References:
        - [Fedus et al., 2021](https://arxiv.org/abs/2101.03961)
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        router_jitter=0.01,
        load_balance_loss_weight=1e-2,
        router_z_loss_weight=1e-3,
        expert_dropout=0.0,
        activation="relu",
        **kwargs,
    ):
        kwargs.setdefault("top_k", 1)
        kwargs.setdefault("normalize_top_k", False)
        super().__init__(
            num_experts=num_experts,
            intermediate_dim=intermediate_dim,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            router_jitter=router_jitter,
            load_balance_loss_weight=load_balance_loss_weight,
            router_z_loss_weight=router_z_loss_weight,
            expert_dropout=expert_dropout,
            activation=activation,
            **kwargs,
        )
