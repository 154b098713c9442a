"""MoE: the layer core that runs any router's plan through stacked experts."""

import inspect

import keras
from keras import ops

from keras_moe import backend as fast
from keras_moe import compat
from keras_moe import dispatch
from keras_moe import distribution
from keras_moe.routers.base import Router
from keras_moe.validation import check_int
from keras_moe.validation import check_positive

#: The non-trainable variables `MoE.routing_statistics` reads, in the order
#: `build` creates them (after the older state).
TRAINING_STATISTICS = (
    "assignment_counts",
    "average_load",
    "training_steps",
    "dropped_fraction",
    "router_entropy",
    "router_confidence",
    "aux_loss_values",
    "accumulated_counts",
)


@keras.saving.register_keras_serializable(package="keras_moe")
class MoE(keras.layers.Layer):
    """Mixture-of-experts layer: a router decides, the layer moves tokens.

    The layer routes its tokens with `router` (any `keras_moe.routers.Router`),
    moves each token to the experts the `RoutingPlan` names, runs `experts`
    there, and combines the results with the plan's weights; an optional
    always-on `shared_expert` is added. Only routed assignments are computed.

    Three ways to move tokens, chosen per call:

    - dropless (no capacity factor): every routed assignment is computed
      (`keras_moe.dispatch.dispatch_dropless`);
    - capacity: each expert takes at most
      `ceil(cf * tokens_in_group * k / num_experts)` assignments per routing
      group of `group_size` tokens; first choices are served before second
      choices, and within a choice rank earlier tokens first, or the tokens
      the router gave a higher `priority`;
    - slots named by the router (Expert Choice): the plan's own slots.

    Masked tokens (Keras mask) are not routed, take no capacity and produce
    zero output. Tokens whose router logits are not finite are not routed
    either (so they take no capacity from finite tokens), output NaN and are
    counted in `nonfinite_count`. Assignments dropped by capacity are
    counted in `dropped_count`; `expert_counts` holds the assignments each
    expert computed in the latest call. Training calls also keep routing
    statistics (assignments per expert before capacity and their running
    average, the dropped fraction, router entropy and confidence, the
    unweighted auxiliary losses) in non-trainable variables; see
    `routing_statistics`, `keras_moe.routing_stats` and
    `keras_moe.callbacks`.

    `SparseMoE` and `SwitchFFN` are this layer with a `TopKRouter` and
    `StackedExperts` built from flat arguments.

    Args:
        router: a `keras_moe.routers.Router`.
        experts: the experts: a `keras_moe.experts.StackedExperts`, a
            subclass of `keras_moe.experts.Experts`, or any layer with
            `num_experts` and `call` on capacity buffers `(..., E, C,
            hidden)` (then a capacity factor is needed; see
            `keras_moe.experts.base` for the protocol).
        capacity_factor: float > 0 or `None` (dropless). Defaults to `None`.
        eval_capacity_factor: float > 0 or `None` (same as
            `capacity_factor`), used when not training. Defaults to `None`.
        group_size: int >= 1 or `None` (all tokens of the call form one
            group): tokens per routing group for capacity. Needs a capacity
            factor (or a router that picks its own slots). Defaults to
            `None`.
        shared_expert: optional layer `(..., hidden) -> (..., hidden)` run on
            every token and added to the output.
        shared_gate: optional layer `(..., hidden) -> (..., 1)`; the shared
            expert's output is scaled by its sigmoid.
        **kwargs: standard layer arguments (`name`, `dtype`, ...).

    Call arguments:
        - `inputs`: `(..., hidden)` tensor, rank >= 2.
        - `training`: bool, training mode (losses, noise, capacity factor).
        - `mask`: optional bool `(...)`, `False` for padding tokens.
        - `return_routing`: bool; if `True` returns `(outputs, routing)`
          with `routing` a dict of `router_logits (..., E)` float32,
          `expert_indices (..., k)` int32 (best first), `expert_weights
          (..., k)` and `dispatched (..., k)` bool.
        - `router_inputs`: optional tensor of the inputs' shape that the
          router sees instead of `inputs` (the experts still get `inputs`),
          for models that route on another view of the token than the one
          the experts transform (Gemma 4 routes the un-normalized residual).

    Examples:
        >>> import numpy as np
        >>> import keras_moe
        >>> layer = keras_moe.layers.MoE(
        ...     router=keras_moe.routers.TopKRouter(num_experts=4, top_k=2),
        ...     experts=keras_moe.experts.StackedExperts(num_experts=4, intermediate_dim=16),
        ... )
        >>> tuple(layer(np.zeros((2, 5, 8), "float32")).shape)
        (2, 5, 8)

    References:
        - [Lepikhin et al., 2020 (GShard)](https://arxiv.org/abs/2006.16668)
        - [Fedus et al., 2021 (Switch)](https://arxiv.org/abs/2101.03961)
        - flaxformer's `moe_layers.py`: the router / dispatch / experts split.
    """

    #: Variables added after the first release, in the order they were added
    #: (see `keras_moe.compat`).
    added_variables = ("nonfinite_count",) + TRAINING_STATISTICS
    #: Momentum of `average_load`: a plain mean over the first
    #: `1 / (1 - momentum)` training calls, an exponential moving average
    #: after them.
    statistics_momentum = 0.99

    def __init__(
        self,
        router,
        experts,
        capacity_factor=None,
        eval_capacity_factor=None,
        group_size=None,
        shared_expert=None,
        shared_gate=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(router, Router):
            raise ValueError(
                "`router` must be a keras_moe.routers.Router. "
                f"Received: router={router!r}"
            )
        num_experts = getattr(experts, "num_experts", None)
        if num_experts != router.num_experts:
            raise ValueError(
                "`experts.num_experts` must equal `router.num_experts`. Received: "
                f"experts.num_experts={num_experts}, router.num_experts={router.num_experts}"
            )
        for name, value in (
            ("capacity_factor", capacity_factor),
            ("eval_capacity_factor", eval_capacity_factor),
        ):
            if value is not None:
                check_positive(name, value)
        if group_size is not None:
            check_int("group_size", group_size, 1)
            if capacity_factor is None and eval_capacity_factor is None and not router.names_slots:
                raise ValueError(
                    "`group_size` sets the routing groups of capacity dispatch, so it needs "
                    "`capacity_factor` or `eval_capacity_factor`; without either the layer "
                    f"is dropless and would ignore it. Received: group_size={group_size}, "
                    "capacity_factor=None, eval_capacity_factor=None"
                )
        if capacity_factor is None and not router.names_slots and not supports_dropless(experts):
            raise ValueError(
                "Dropless dispatch (`capacity_factor=None`) needs experts that run on rows "
                f"without a capacity buffer ({', '.join(DROPLESS_METHODS)}); "
                f"{type(experts).__name__} has only `call` on capacity buffers. Pass a "
                "`capacity_factor`, or subclass `keras_moe.experts.Experts`, which provides "
                "them from one formula."
            )
        if shared_gate is not None and shared_expert is None:
            raise ValueError("`shared_gate` needs a `shared_expert`. Received: shared_expert=None")
        self.router = router
        # Routers whose `call` takes `defer_losses` (a subclass may override
        # `call` without it) have their losses added after the experts.
        self._defer_router_losses = "defer_losses" in inspect.signature(router.call).parameters
        self.experts = experts
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.group_size = group_size
        self.shared_expert = shared_expert
        self.shared_gate = shared_gate
        self.supports_masking = True

    @property
    def num_experts(self):
        return self.router.num_experts

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
        # Parts may come built (deserialized with their build config).
        for part, shape in (
            (self.router, (None, None, hidden)),
            (self.experts, (None, hidden)),
            (self.shared_expert, (None, hidden)),
            (self.shared_gate, (None, hidden)),
        ):
            if part is not None and not part.built:
                part.build(shape)
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
        self.nonfinite_count = self.add_weight(
            name="nonfinite_count", shape=(), initializer="zeros", dtype="float32", trainable=False
        )
        # Statistics of training calls (`routing_statistics`), created after
        # the older state so that earlier `.keras` files still load.
        num_losses = len(self.router.loss_names)
        shapes = {"assignment_counts": (self.num_experts,), "average_load": (self.num_experts,),
                  "aux_loss_values": (num_losses,), "accumulated_counts": (self.num_experts,)}
        for name in TRAINING_STATISTICS:
            setattr(self, name, self.add_weight(
                name=name, shape=shapes.get(name, ()), initializer="zeros", dtype="float32",
                trainable=False,
            ))

    def load_own_variables(self, store):
        compat.load_own_variables(self, store, self.added_variables)

    def active_capacity_factor(self, training):
        """The capacity factor of a training or inference call (`None`: dropless)."""
        if training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return self.eval_capacity_factor

    def call(self, inputs, training=None, mask=None, return_routing=False, router_inputs=None):
        inputs = ops.convert_to_tensor(inputs)
        if not keras.backend.is_float_dtype(inputs.dtype):
            # Like Keras layers: integer inputs are numbers, cast to compute.
            inputs = ops.cast(inputs, self.compute_dtype)
        self._check_mask_shape(inputs, mask)
        self._check_router_inputs_shape(inputs, router_inputs)
        input_shape = ops.shape(inputs)
        lead = tuple(input_shape[:-1])
        hidden = input_shape[-1]
        x = ops.reshape(inputs, (-1, hidden))  # (T, hidden)
        tokens = ops.shape(x)[0]
        if isinstance(tokens, int) and tokens == 0:
            return self._empty_call(inputs, return_routing)
        token_mask = None if mask is None else ops.reshape(ops.cast(mask, "bool"), (-1,))
        # The shared expert needs no routing: issued first, an eager GPU step
        # computes it while the host is still working out the routing.
        shared = None
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_gate is not None:
                shared = shared * ops.sigmoid(self.shared_gate(x))

        capacity_factor = self.active_capacity_factor(training)
        grouped = capacity_factor is not None or self.router.names_slots
        group_size = self.group_size if grouped else None
        x_groups, mask_groups = self._to_groups(x, token_mask, group_size)
        if grouped:
            # Expert parallelism: each device routes its own groups.
            x_groups = distribution.shard_groups(x_groups)
            mask_groups = None if mask_groups is None else distribution.shard_groups(mask_groups)
        router_groups = x_groups
        if router_inputs is not None:
            router_flat = ops.reshape(ops.convert_to_tensor(router_inputs), (-1, hidden))
            router_groups, _ = self._to_groups(router_flat, token_mask, group_size)
            if grouped:
                router_groups = distribution.shard_groups(router_groups)
        # The router's losses are added after the experts are issued (see
        # `keras_moe.routers.LazyLosses`).
        defer = {"defer_losses": True} if self._defer_router_losses else {}
        plan = self.router(router_groups, token_mask=mask_groups, training=training, **defer)
        flats = {}  # each (G, S, ...) plan tensor flattened once: (T, ...)

        def flat(t):
            if id(t) not in flats:  # t is kept too, so its id stays unique
                flats[id(t)] = (t, ops.reshape(t, (-1,) + tuple(ops.shape(t)[2:]))[:tokens])
            return flats[id(t)][1]

        if plan.slots is not None:
            dispatched = ops.logical_and(
                plan.dispatch_mask, plan.slots < self.num_experts * plan.capacity
            )
            outputs = dispatch.dispatch_to_slots(
                x_groups, plan.slots, plan.expert_weights, dispatched, self.experts,
                plan.capacity, training=training,
            )
            outputs = flat(outputs)
        elif capacity_factor is None:
            dispatched = plan.dispatch_mask
            assignments = (flat(plan.expert_indices), flat(plan.expert_weights), flat(dispatched))
            # Under expert parallelism (JAX): tokens travel to their experts'
            # devices; elsewhere `None`, and the single-device dispatch runs.
            outputs = fast.expert_parallel_dropless(x, *assignments, self.experts, training=training)
            if outputs is None:
                outputs = dispatch.dispatch_dropless(x, *assignments, self.experts, training=training)
        else:
            k = ops.shape(plan.expert_indices)[-1]
            capacity = dispatch.compute_capacity(
                capacity_factor, ops.shape(x_groups)[1], k, self.num_experts
            )
            outputs, dispatched = dispatch.dispatch_with_capacity(
                x_groups, plan.expert_indices, plan.expert_weights, plan.dispatch_mask,
                self.experts, capacity, training=training, priority=plan.priority,
            )
            outputs = flat(outputs)
        # (T, hidden), and the plan per token: (T, k) / (T,)
        expert_indices, dispatch_mask = flat(plan.expert_indices), flat(plan.dispatch_mask)
        dispatched, routed = flat(dispatched), flat(plan.routed)

        if shared is not None:
            outputs = outputs + shared
        zero = ops.zeros((), outputs.dtype)
        if token_mask is not None:
            outputs = ops.where(ops.expand_dims(token_mask, -1), outputs, zero)
            nonfinite = ops.logical_and(token_mask, ops.logical_not(routed))
        else:
            nonfinite = ops.logical_not(routed)
        # Unroutable tokens are not routed, but their output must not pass
        # for a real one.
        outputs = ops.where(ops.expand_dims(nonfinite, -1), fast.scalar_like(float("nan"), outputs), outputs)
        # Dropless dispatch serves every assignment the router made: one
        # count serves both statistics, and none are dropped.
        dropless = plan.slots is None and capacity_factor is None
        # (Counts through `fast`: no host-to-device copies on torch.)
        chosen = fast.count_ids(expert_indices, self.num_experts, where=dispatch_mask)
        if dropless:
            served, dropped = chosen, ops.zeros((), "float32")
        else:
            served = fast.count_ids(expert_indices, self.num_experts, where=dispatched)
            dropped = ops.sum(
                ops.cast(ops.logical_and(dispatch_mask, ops.logical_not(dispatched)), "float32")
            )
        self._record_statistics(served, dropped, nonfinite)
        if training:
            if self._defer_router_losses:
                self.router.add_aux_losses(plan)
            self._record_training_statistics(plan, chosen, dropped, routed)

        outputs = ops.reshape(outputs, input_shape)
        if not return_routing:
            return outputs
        k = ops.shape(expert_indices)[-1]
        return outputs, {
            "router_logits": ops.reshape(flat(plan.router_logits), lead + (self.num_experts,)),
            "expert_indices": ops.reshape(expert_indices, lead + (k,)),
            "expert_weights": ops.reshape(flat(plan.expert_weights), lead + (k,)),
            "dispatched": ops.reshape(dispatched, lead + (k,)),
        }

    def _check_mask_shape(self, inputs, mask):
        check_mask_shape(self, inputs, mask)

    def _check_router_inputs_shape(self, inputs, router_inputs):
        if router_inputs is None:
            return
        expected, got = tuple(inputs.shape), tuple(router_inputs.shape)
        if not _compatible_shapes(expected, got):
            raise ValueError(
                f"{self.__class__.__name__}: `router_inputs` must have the shape of the "
                f"inputs, {expected}. Received: router_inputs.shape={got}"
            )

    def _to_groups(self, x, token_mask, group_size):
        """`(T, hidden)` -> `(G, S, hidden)` routing groups, and their mask.

        With `group_size`, the tokens are padded to whole groups with masked
        tokens; without, all tokens form one group.
        """
        tokens, hidden = ops.shape(x)[0], ops.shape(x)[1]
        if group_size is None:
            mask = None if token_mask is None else ops.expand_dims(token_mask, 0)
            return ops.expand_dims(x, 0), mask
        pad = (-tokens) % group_size
        x = ops.concatenate([x, ops.zeros((pad, hidden), x.dtype)], axis=0)
        mask = ops.ones((tokens,), "bool") if token_mask is None else token_mask
        mask = ops.concatenate([mask, ops.zeros((pad,), "bool")], axis=0)
        return ops.reshape(x, (-1, group_size, hidden)), ops.reshape(mask, (-1, group_size))

    def _record_statistics(self, served, dropped, nonfinite):
        """Served assignments per expert `(E,)`, dropped assignments and unroutable tokens."""
        self.expert_counts.assign(served)
        self.dropped_count.assign(dropped)
        self.nonfinite_count.assign(ops.sum(ops.cast(nonfinite, "float32")))

    def _record_training_statistics(self, plan, counts, dropped, routed):
        """Updates the statistics of training calls from the plan of this call.

        `counts` are the `(E,)` assignments per expert before capacity (of
        routed tokens only), `dropped` the assignments capacity dropped, and
        `routed` the `(T,)` routed tokens, flat over the call's real tokens.
        Beyond the counts, the work is elementwise math on the `(T, E)`
        router probabilities.
        """
        num_experts = self.num_experts
        tokens = ops.shape(routed)[0]
        total = ops.sum(counts)
        one = fast.scalar_like(1.0, total)
        seen = total > 0
        load = counts / ops.maximum(total, one)
        steps = self.training_steps + ops.cast(seen, "float32")
        # A plain mean at first (no bias toward the zero start), then an EMA.
        rate = ops.maximum(
            one / ops.maximum(steps, one), fast.scalar_like(1.0 - self.statistics_momentum, total)
        )
        average = self.average_load + ops.cast(seen, "float32") * rate * (load - self.average_load)

        # Entropy and confidence of the router's distribution (scores
        # normalized to sum 1, as for sigmoid routers), over routed tokens.
        probs = ops.stop_gradient(ops.cast(plan.router_probs, "float32"))
        probs = ops.reshape(probs, (-1, num_experts))[:tokens]  # (T, E)
        tiny = fast.scalar_like(1e-20, probs)
        probs = probs / ops.maximum(ops.sum(probs, axis=-1, keepdims=True), tiny)
        entropy = -ops.sum(probs * ops.log(ops.maximum(probs, tiny)), axis=-1)  # (T,)
        # amax, not max: torch.compile cannot trace Keras' torch `max` (a graph break).
        confidence = ops.amax(probs, axis=-1)  # (T,)
        num_routed = ops.maximum(ops.sum(ops.cast(routed, "float32")), one)
        zero = ops.zeros((), "float32")
        mean_over_routed = lambda v: ops.sum(ops.where(routed, v, zero)) / num_routed  # noqa: E731

        self.assignment_counts.assign(counts)
        self.average_load.assign(average)
        self.training_steps.assign(steps)
        self.dropped_fraction.assign(dropped / ops.maximum(total, one))
        self.router_entropy.assign(mean_over_routed(entropy))
        self.router_confidence.assign(mean_over_routed(confidence))
        self.accumulated_counts.assign(self.accumulated_counts + counts)
        aux_losses = plan.aux_losses or {}
        if self.router.loss_names and aux_losses:
            # A loss the router did not compute this call keeps its value.
            values = [
                ops.cast(ops.stop_gradient(aux_losses[name]), "float32") if name in aux_losses
                else self.aux_loss_values[i]
                for i, name in enumerate(self.router.loss_names)
            ]
            self.aux_loss_values.assign(ops.stack(values))

    def routing_statistics(self):
        """The routing statistics of this layer's training calls.

        Updated by every call with `training=True` (inference calls leave
        them alone, so validation inside `fit` does not overwrite them) from
        the routing plan, counting routed tokens only: masked tokens and
        tokens with non-finite router logits are left out. This is the
        statistics protocol `keras_moe.routing_stats` and the callbacks of
        `keras_moe.callbacks` read; see the "Monitoring routing" docs page.

        On JAX, `fit` keeps the model state outside the variables during an
        epoch: call this through `keras_moe.routing_stats(model)` or, in a
        callback, through `self.model`.

        Returns:
            A dict of NumPy arrays and Python numbers:
            `assignment_counts` `(E,)`, the assignments routed to each
            expert in the latest training call, before capacity;
            `expert_load` `(E,)`, the same as shares of all assignments;
            `average_load` `(E,)`, the running average of `expert_load`
            (a mean over the first 100 training calls, then an exponential
            moving average with momentum `statistics_momentum`);
            `load_max_mean_ratio`, the busiest expert's count over the mean
            count (1.0 when balanced, `E` when one expert takes everything);
            `dropped_fraction`, the share of assignments capacity dropped;
            `router_entropy`, the mean entropy (nats) of the router's
            distribution over experts (scores normalized to sum 1), at most
            `log(E)`; `router_confidence`, the mean of its largest entry;
            `aux_losses`, a dict of the router's auxiliary losses before
            weighting; `training_steps` (int), the training calls counted.
            The floats describe the latest training call.
        """
        value = lambda v: keras.ops.convert_to_numpy(v.value).astype("float64")  # noqa: E731
        counts = value(self.assignment_counts)
        total = counts.sum()
        return {
            "assignment_counts": counts,
            "expert_load": counts / total if total > 0 else counts,
            "average_load": value(self.average_load),
            "load_max_mean_ratio": float(counts.max() * self.num_experts / total) if total > 0 else 0.0,
            "dropped_fraction": float(value(self.dropped_fraction)),
            "router_entropy": float(value(self.router_entropy)),
            "router_confidence": float(value(self.router_confidence)),
            "aux_losses": {
                name: float(v)
                for name, v in zip(self.router.loss_names, value(self.aux_loss_values))
            },
            "training_steps": int(value(self.training_steps)),
        }

    def reset_routing_statistics(self):
        """Sets the statistics of training calls (and their counters) to zero."""
        for name in TRAINING_STATISTICS:
            variable = getattr(self, name)
            variable.assign(ops.zeros(variable.shape, variable.dtype))

    def _empty_call(self, inputs, return_routing):
        """A call without tokens: an empty output and empty routing."""
        self.expert_counts.assign(ops.zeros((self.num_experts,), "float32"))
        self.dropped_count.assign(0.0)
        self.nonfinite_count.assign(0.0)
        outputs = ops.zeros(ops.shape(inputs), self.compute_dtype)
        if not return_routing:
            return outputs
        lead = tuple(ops.shape(inputs)[:-1])
        k = self.router.num_selected
        return outputs, {
            "router_logits": ops.zeros(lead + (self.num_experts,), "float32"),
            "expert_indices": ops.zeros(lead + (k,), "int32"),
            "expert_weights": ops.zeros(lead + (k,), "float32"),
            "dispatched": ops.zeros(lead + (k,), "bool"),
        }

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(
        self, inputs, training=None, mask=None, return_routing=False, router_inputs=None
    ):
        outputs = keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)
        if not return_routing:
            return outputs
        lead = tuple(inputs.shape[:-1])
        k = self.router.num_selected
        return outputs, {
            "router_logits": keras.KerasTensor(lead + (self.num_experts,), dtype="float32"),
            "expert_indices": keras.KerasTensor(lead + (k,), dtype="int32"),
            "expert_weights": keras.KerasTensor(lead + (k,), dtype="float32"),
            "dispatched": keras.KerasTensor(lead + (k,), dtype="bool"),
        }

    def get_config(self):
        config = super().get_config()
        serialize = keras.saving.serialize_keras_object
        config.update(
            {
                "router": serialize(self.router),
                "experts": serialize(self.experts),
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "group_size": self.group_size,
                "shared_expert": None if self.shared_expert is None else serialize(self.shared_expert),
                "shared_gate": None if self.shared_gate is None else serialize(self.shared_gate),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("router", "experts", "shared_expert", "shared_gate"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


#: The experts' methods dropless dispatch calls (see `keras_moe.experts.base`).
DROPLESS_METHODS = ("call_dropless",)


def supports_dropless(experts):
    """Whether `experts` has the methods dropless dispatch needs."""
    return all(callable(getattr(experts, name, None)) for name in DROPLESS_METHODS)


def check_mask_shape(layer, inputs, mask):
    """Raises `ValueError` unless `mask` has the shape of `inputs` without the last axis."""
    if mask is None:
        return
    expected, got = tuple(inputs.shape[:-1]), tuple(mask.shape)
    if not _compatible_shapes(expected, got):
        raise ValueError(
            f"{layer.__class__.__name__}: `mask` must have the shape of the inputs without "
            f"their last (hidden) dimension, {expected}. Received: mask.shape={got} for "
            f"inputs.shape={tuple(inputs.shape)}"
        )


def _compatible_shapes(expected, got):
    """Same rank, and equal wherever both dimensions are known."""
    return len(expected) == len(got) and all(
        a is None or b is None or a == b for a, b in zip(expected, got)
    )
