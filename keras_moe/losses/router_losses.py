"""Auxiliary losses that keep a router balanced and its logits small."""

import math

from keras import ops

from keras_moe.backend.constants import count_ids, scalar_like


def _token_count(keep, values):
    """How many tokens `keep (tokens,)` keeps (at least 1), or all rows of `values`."""
    if keep is None:
        tokens = ops.shape(values)[0]
        if isinstance(tokens, int):
            return scalar_like(float(tokens), values, "float32")
        return ops.cast(tokens, "float32")
    total = ops.sum(ops.cast(keep, "float32"))
    return ops.maximum(total, scalar_like(1.0, total))


def _masked_mean(values, mask):
    """Mean of `values (tokens, ...)` over the tokens `mask (tokens,)` keeps.

    `where`, not a product with the mask: a left-out token's values may be
    NaN (a padding token, a token with non-finite logits), and `NaN * 0` is
    NaN.
    """
    if mask is None:
        return ops.mean(values, axis=0)
    keep = ops.reshape(ops.cast(mask, "bool"), (-1,))
    kept = ops.where(
        ops.reshape(keep, (-1,) + (1,) * (len(values.shape) - 1)),
        values,
        scalar_like(0.0, values),
    )
    return ops.sum(kept, axis=0) / _token_count(keep, values)


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
    top_k = expert_indices.shape[-1]
    indices = ops.reshape(ops.cast(expert_indices, "int32"), (-1, top_k))
    keep = None if mask is None else ops.reshape(ops.cast(mask, "bool"), (-1,))
    if keep is not None:
        # A left-out token's scores may be NaN: selected away, not multiplied.
        probs = ops.where(ops.expand_dims(keep, -1), probs, scalar_like(0.0, probs))
    sums = ops.sum(probs, axis=-1, keepdims=True)
    probs = probs / ops.maximum(sums, scalar_like(1e-20, sums))
    tokens = _token_count(keep, probs)
    # The assignments per expert: a count over the (tokens, k) choices, no
    # (tokens, k, E) one-hot table.
    chosen = None if keep is None else ops.expand_dims(keep, -1)  # a left-out token's choices
    fraction = count_ids(indices, num_experts, where=chosen) / (tokens * top_k)  # (E,)
    mean_prob = ops.sum(probs, axis=0) / tokens  # (E,)
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
    return _masked_mean(z, mask)


def cv_squared(x):
    """Squared coefficient of variation of a sample: `var(x) / (mean(x)**2 + eps)`.

    0 when all entries are equal; the balancing losses of Shazeer et al.
    (2017) apply it to per-expert totals. As in tensor2tensor's
    `cv_squared`, the variance is the population variance and `eps = 1e-10`.

    Args:
        x: float tensor; all its entries form the sample.

    Returns:
        A float32 scalar.

    Examples:
        >>> import numpy as np
        >>> float(cv_squared(np.array([2.0, 2.0, 2.0], "float32")))
        0.0
        >>> round(float(cv_squared(np.array([1.0, 3.0], "float32"))), 4)
        0.25
    """
    x = ops.reshape(ops.cast(x, "float32"), (-1,))
    mean = ops.mean(x)
    variance = ops.mean(ops.square(x - mean))
    return variance / (ops.square(mean) + 1e-10)


def _masked_token_sum(values, mask):
    """Sum over tokens of `values (..., E)`, leaving out masked tokens.

    `where`, not a product: a masked token's values may be NaN (a token with
    non-finite logits), and `NaN * 0` is NaN.
    """
    values = ops.cast(values, "float32")
    num_experts = values.shape[-1]
    values = ops.reshape(values, (-1, num_experts))
    if mask is not None:
        keep = ops.reshape(ops.cast(mask, "bool"), (-1, 1))
        values = ops.where(keep, values, ops.zeros((), "float32"))
    return ops.sum(values, axis=0)  # (E,)


def importance_loss(gates, mask=None):
    """Importance loss of Shazeer et al. (2017): `cv_squared` of the expert importances.

    An expert's importance is the sum over tokens of its gate value (its
    combine weight, 0 where it was not chosen). The loss is 0 when every
    expert receives the same total weight.

    Args:
        gates: float tensor `(..., num_experts)`, each token's gate values
            (dense: zero for experts the token does not use).
        mask: optional bool tensor `(...)`; `False` marks padding tokens,
            which are left out.

    Returns:
        A float32 scalar, unweighted.

    Examples:
        >>> import numpy as np
        >>> gates = np.array([[0.7, 0.3], [0.3, 0.7]], "float32")
        >>> float(importance_loss(gates))
        0.0

    References:
        - [Shazeer et al., 2017](https://arxiv.org/abs/1701.06538), eq. 6.
    """
    return cv_squared(_masked_token_sum(gates, mask))


def _normal_cdf(x):
    return 0.5 * (1.0 + ops.erf(x / math.sqrt(2.0)))


def prob_in_top_k(clean_logits, noisy_logits, noise_stddev, top_k):
    """Probability that each expert stays in a token's top `k` under new noise.

    For expert `e` of a token, the noise of the other experts held fixed,
    `e` is in the top `k` if its noisy logit beats the `k`-th largest noisy
    logit among the others: that threshold is the `k`-th largest noisy logit
    overall if `e` is currently out of the top `k`, the `(k+1)`-th if it is
    in. So `P = Phi((clean_e - threshold) / stddev_e)` with `Phi` the
    standard normal CDF (tensor2tensor's `_prob_in_top_k`). Differentiable in
    the clean logits and the noise scale.

    Args:
        clean_logits: `(..., E)` float logits without noise.
        noisy_logits: `(..., E)` the logits the router selected on.
        noise_stddev: `(..., E)` the noise scale of each logit, > 0.
        top_k: int `k < E`.

    Returns:
        `(..., E)` float32 probabilities.
    """
    clean_logits = ops.cast(clean_logits, "float32")
    noisy_logits = ops.cast(noisy_logits, "float32")
    noise_stddev = ops.cast(noise_stddev, "float32")
    top_values, _ = ops.top_k(noisy_logits, top_k + 1)  # (..., k + 1)
    threshold_if_in = top_values[..., top_k : top_k + 1]  # the (k+1)-th largest
    threshold_if_out = top_values[..., top_k - 1 : top_k]  # the k-th largest
    is_in = noisy_logits > threshold_if_in
    prob_if_in = _normal_cdf((clean_logits - threshold_if_in) / noise_stddev)
    prob_if_out = _normal_cdf((clean_logits - threshold_if_out) / noise_stddev)
    return ops.where(is_in, prob_if_in, prob_if_out)


def load_loss(clean_logits, noisy_logits, noise_stddev, top_k, mask=None):
    """Load loss of Shazeer et al. (2017): `cv_squared` of the smooth expert loads.

    An expert's load is the expected number of tokens that choose it: the sum
    over tokens of `prob_in_top_k`, the probability that it stays in the
    token's top `k` when the noise is drawn again. Unlike a count, it has a
    gradient, which flows into the router kernel and the noise kernel. When
    `top_k >= E` every expert is always chosen and the loss is 0.

    Args:
        clean_logits: float tensor `(..., E)`, the logits without noise.
        noisy_logits: float tensor `(..., E)`, the noisy logits the router
            selected on.
        noise_stddev: float tensor `(..., E)` (> 0), the noise scale of each
            noisy logit.
        top_k: int, the experts each token chooses.
        mask: optional bool tensor `(...)`; `False` marks padding tokens,
            which are left out.

    Returns:
        A float32 scalar, unweighted.

    Examples:
        >>> import numpy as np
        >>> clean = np.zeros((4, 3), "float32")
        >>> noisy = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], "float32")
        >>> float(load_loss(clean, noisy, np.ones((4, 3), "float32"), top_k=1)) > 0
        True

    References:
        - [Shazeer et al., 2017](https://arxiv.org/abs/1701.06538), appendix A.
        - tensor2tensor's `utils/expert_utils.py` (`noisy_top_k_gating`).
    """
    num_experts = clean_logits.shape[-1]
    if top_k >= num_experts:
        return ops.zeros((), "float32")
    probs = prob_in_top_k(clean_logits, noisy_logits, noise_stddev, top_k)
    return cv_squared(_masked_token_sum(probs, mask))
