"""SparseMoE: token-choice top-k mixture-of-experts feed-forward layer."""

import keras

from keras_moe.experts import FeedForward
from keras_moe.experts import StackedExperts
from keras_moe.layers.moe import MoE
from keras_moe.routers import NoisyTopKRouter
from keras_moe.routers import TopKRouter
from keras_moe.validation import check_float_dtype
from keras_moe.validation import check_int
from keras_moe.validation import renamed_arguments


@keras.saving.register_keras_serializable(package="keras_moe")
class SparseMoE(MoE):
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

    Two routing variants are flags: `noisy_gating=True` makes the router a
    `NoisyTopKRouter` (Shazeer et al., 2017: trainable noise on the logits
    in training, plus the importance and load losses), and
    `second_expert_policy` applies GShard's `"random"` or `"sampling"`
    policy to the second of `top_k=2` experts.

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
        batch_prioritized_routing: bool, serve capacity to the tokens the
            router is most confident about first (V-MoE) instead of in token
            order. Defaults to `False`.
        second_expert_policy: `"all"`, `"random"` or `"sampling"`, GShard's
            policy for the second expert; needs `top_k=2`. `"random"` keeps
            the second expert with probability `min(1, w_2 /
            second_expert_threshold)`, `"sampling"` draws it from the scores
            of the other experts. Defaults to `"all"`.
        second_expert_threshold: float > 0, see `second_expert_policy`.
            Defaults to 0.2.
        eval_second_expert_policy: the policy when not training, or `None`
            for `second_expert_policy`. Defaults to `None`.
        noisy_gating: bool, noisy top-k gating (Shazeer et al., 2017): in
            training, `N(0, 1) * (softplus(x @ router.noise_kernel) +
            noise_epsilon)` is added to the logits, and the importance and
            load losses are added. Needs `score_func="softmax"`,
            `num_groups=1` and no expert-bias updates. Defaults to `False`.
        noise_epsilon: float >= 0, the noise scale's floor with
            `noisy_gating`. Defaults to 1e-2.
        importance_loss_weight: float >= 0, weight of
            `keras_moe.losses.importance_loss`; `None` means 1e-2 with
            `noisy_gating` and 0 without. Defaults to `None`.
        load_loss_weight: float >= 0, weight of `keras_moe.losses.load_loss`
            (needs `noisy_gating`); `None` means 1e-2 with `noisy_gating`
            and 0 without. Defaults to `None`.
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
        batch_prioritized_routing=False,
        second_expert_policy="all",
        second_expert_threshold=0.2,
        eval_second_expert_policy=None,
        noisy_gating=False,
        noise_epsilon=1e-2,
        importance_loss_weight=None,
        load_loss_weight=None,
        kernel_initializer="glorot_uniform",
        router_initializer="glorot_uniform",
        bias_initializer="zeros",
        seed=None,
        **kwargs,
    ):
        # Each argument is validated once, by the part that uses it; errors
        # name the arguments as this layer calls them.
        router_kwargs = dict(
            num_experts=num_experts,
            top_k=top_k,
            normalize_top_k=normalize_top_k,
            routed_scaling_factor=routed_scaling_factor,
            use_bias=router_bias,
            jitter=router_jitter,
            batch_prioritized_routing=batch_prioritized_routing,
            second_expert_policy=second_expert_policy,
            second_expert_threshold=second_expert_threshold,
            eval_second_expert_policy=eval_second_expert_policy,
            load_balance_loss_weight=load_balance_loss_weight,
            z_loss_weight=router_z_loss_weight,
            kernel_initializer=router_initializer,
            seed=seed,
            dtype=check_float_dtype("router_dtype", router_dtype),
            name="router",
        )
        top_k_kwargs = dict(
            score_func=score_func,
            num_groups=num_groups,
            top_groups=top_groups,
            expert_bias_update_rate=expert_bias_update_rate,
        )
        with renamed_arguments(
            use_bias="router_bias",
            jitter="router_jitter",
            z_loss_weight="router_z_loss_weight",
        ):
            if noisy_gating:
                router = NoisyTopKRouter(
                    noise_epsilon=noise_epsilon,
                    importance_loss_weight=1e-2 if importance_loss_weight is None
                    else importance_loss_weight,
                    load_loss_weight=1e-2 if load_loss_weight is None else load_loss_weight,
                    # Only changed ones: NoisyTopKRouter refuses to change them.
                    **{k: v for k, v in top_k_kwargs.items() if v != TOP_K_DEFAULTS[k]},
                    **router_kwargs,
                )
            else:
                for name, value, unused in (
                    ("importance_loss_weight", importance_loss_weight, (None, 0)),
                    ("load_loss_weight", load_loss_weight, (None, 0)),
                    ("noise_epsilon", noise_epsilon, (1e-2,)),
                ):
                    if value not in unused:
                        raise ValueError(
                            f"`{name}` belongs to noisy top-k gating: set `noisy_gating=True`. "
                            f"Received: {name}={value!r}, noisy_gating=False"
                        )
                router = TopKRouter(**top_k_kwargs, **router_kwargs)
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
        super().__init__(
            router=router,
            experts=experts,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            group_size=group_size,
            shared_expert=shared_expert,
            shared_gate=shared_gate,
            **kwargs,
        )
        self.shared_intermediate_dim = int(shared_intermediate_dim)
        self.seed = seed

    @property
    def top_k(self):
        return self.router.top_k

    def get_config(self):
        # Flat, as the constructor takes them (not MoE's nested router/experts).
        config = keras.layers.Layer.get_config(self)
        router = self.router
        noisy = isinstance(router, NoisyTopKRouter)
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": router.top_k,
                "score_func": router.score_func,
                "normalize_top_k": router.normalize_top_k,
                "routed_scaling_factor": router.routed_scaling_factor,
                "num_groups": router.num_groups,
                "top_groups": router.top_groups,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "group_size": self.group_size,
                "router_bias": router.use_bias,
                "router_jitter": router.jitter,
                "router_dtype": router.dtype_policy.name,
                "load_balance_loss_weight": router.initial_loss_weights["load_balance"],
                "router_z_loss_weight": router.initial_loss_weights["z"],
                "expert_bias_update_rate": router.expert_bias_update_rate,
                "batch_prioritized_routing": router.batch_prioritized_routing,
                "second_expert_policy": router.second_expert_policy,
                "second_expert_threshold": router.second_expert_threshold,
                "eval_second_expert_policy": router.eval_second_expert_policy,
                "noisy_gating": noisy,
                "noise_epsilon": router.noise_epsilon if noisy else 1e-2,
                "importance_loss_weight": router.initial_loss_weights.get("importance", 0.0),
                "load_loss_weight": router.initial_loss_weights.get("load", 0.0),
                "router_initializer": keras.initializers.serialize(router.kernel_initializer),
                "seed": self.seed,
                **feed_forward_config(self),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# TopKRouter's defaults of the arguments NoisyTopKRouter refuses to change.
TOP_K_DEFAULTS = {"score_func": "softmax", "num_groups": 1, "top_groups": None,
                  "expert_bias_update_rate": 0.0}


def feed_forward_parts(
    num_experts,
    intermediate_dim,
    activation,
    gated,
    use_bias,
    expert_dropout,
    shared_intermediate_dim,
    shared_expert_gate,
    kernel_initializer,
    bias_initializer,
    seed,
    dtype,
):
    """The `experts`, `shared_expert` and `shared_gate` of the flat-argument layers.

    Shared by `SparseMoE` and `ExpertChoiceMoE` (and `SoftMoE`'s experts), so
    that their arguments build the same variables under the same paths.
    """
    with renamed_arguments(dropout="expert_dropout"):
        experts = StackedExperts(
            num_experts=num_experts,
            intermediate_dim=intermediate_dim,
            activation=activation,
            gated=gated,
            use_bias=use_bias,
            dropout=expert_dropout,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            seed=seed,
            dtype=dtype,
            name="experts",
        )
    check_int("shared_intermediate_dim", shared_intermediate_dim, 0)
    if shared_expert_gate and shared_intermediate_dim == 0:
        raise ValueError(
            "`shared_expert_gate=True` needs a shared expert: set "
            "`shared_intermediate_dim` >= 1. Received: shared_intermediate_dim=0"
        )
    shared_expert = shared_gate = None
    if shared_intermediate_dim:
        shared_expert = FeedForward(
            intermediate_dim=shared_intermediate_dim,
            activation=activation,
            gated=gated,
            kernel_initializer=kernel_initializer,
            dtype=dtype,
            name="shared_expert",
        )
        if shared_expert_gate:
            shared_gate = keras.layers.Dense(
                1,
                use_bias=False,
                kernel_initializer=kernel_initializer,
                dtype=dtype,
                name="shared_gate",
            )
    return experts, shared_expert, shared_gate


def feed_forward_config(layer):
    """The config entries `feed_forward_parts` takes, read back from `layer`'s parts."""
    experts = layer.experts
    return {
        "intermediate_dim": experts.intermediate_dim,
        "activation": keras.activations.serialize(experts.activation),
        "gated": experts.gated,
        "use_bias": experts.use_bias,
        "expert_dropout": experts.dropout,
        "shared_intermediate_dim": 0 if layer.shared_expert is None
        else layer.shared_expert.intermediate_dim,
        "shared_expert_gate": layer.shared_gate is not None,
        "kernel_initializer": keras.initializers.serialize(experts.kernel_initializer),
        "bias_initializer": keras.initializers.serialize(experts.bias_initializer),
    }
