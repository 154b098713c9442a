"""Auxiliary losses that keep a router balanced and its logits small."""

from keras import ops


def _token_weights(mask):
    """Float weights `(tokens,)` that are 1 for real tokens, 0 for padding."""
    if mask is None:
        return None
    return ops.reshape(ops.cast(mask, "float32"), (-1,))


def _masked_mean(values, weights):
    """Mean of `values (tokens, ...)` over the tokens whose weight is 1."""
    if weights is None:
        return ops.mean(values, axis=0)
    weights = ops.reshape(weights, (-1,) + (1,) * (len(values.shape) - 1))
    total = ops.maximum(ops.sum(weights), 1.0)
    return ops.sum(values * weights, axis=0) / total


def load_balancing_loss(router_probs, expert_indices, mask=None):
    """Switch Transformer load-balancing loss, `1.0` when perfectly balanced.

    `E * sum_e f_e * P_e`, where `f_e` is the fraction of (token, choice)
    assignments made to expert `e` (before any capacity limit) and `P_e` is
    the mean over tokens of expert `e`'s router score, normalized to sum to 1
    over the experts (for a softmax router: the probability itself).

    The Mixtral / Hugging Face `load_balancing_loss_func` equals `top_k` times
    this value.

    Args:
        router_probs: float tensor `(..., num_experts)`, the router scores.
        expert_indices: int tensor `(..., top_k)`, the chosen experts.
        mask: optional bool tensor `(...)`; `False` marks padding tokens,
            which are left out of both means.

    Returns:
        A float32 scalar.

    Examples:
        >>> import numpy as np
        >>> probs = np.full((4, 2), 0.5, "float32")
        >>> indices = np.array([[0], [1], [0], [1]])
        >>> float(load_balancing_loss(probs, indices))
        1.0

    References:
        - [Fedus et al., 2021](https://arxiv.org/abs/2101.03961), eq. 4.
    """
    router_probs = ops.cast(router_probs, "float32")
    num_experts = router_probs.shape[-1]
    probs = ops.reshape(router_probs, (-1, num_experts))
    probs = probs / ops.maximum(ops.sum(probs, axis=-1, keepdims=True), 1e-20)
    top_k = expert_indices.shape[-1]
    indices = ops.reshape(ops.cast(expert_indices, "int32"), (-1, top_k))
    # (tokens, E): how many of a token's k choices went to each expert.
    assignments = ops.sum(ops.one_hot(indices, num_experts, dtype="float32"), axis=1)
    weights = _token_weights(mask)
    fraction = _masked_mean(assignments, weights) / top_k  # (E,)
    mean_prob = _masked_mean(probs, weights)  # (E,)
    return num_experts * ops.sum(fraction * mean_prob)


def router_z_loss(router_logits, mask=None):
    """ST-MoE router z-loss: mean over tokens of `logsumexp(logits) ** 2`.

    Penalizes large router logits, which keeps the float32 softmax stable.

    Args:
        router_logits: float tensor `(..., num_experts)`.
        mask: optional bool tensor `(...)`; `False` marks padding tokens.

    Returns:
        A float32 scalar.

    Examples:
        >>> import numpy as np
        >>> round(float(router_z_loss(np.zeros((3, 4), "float32"))), 4)
        1.9218

    References:
        - [Zoph et al., 2022](https://arxiv.org/abs/2202.08906), eq. 5.
    """
    logits = ops.cast(router_logits, "float32")
    logits = ops.reshape(logits, (-1, logits.shape[-1]))
    z = ops.square(ops.logsumexp(logits, axis=-1))
    return _masked_mean(z, _token_weights(mask))
