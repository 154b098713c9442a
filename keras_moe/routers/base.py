"""The seam between routers and MoE layers: a routing plan and a router base.

A router only decides. It turns tokens into a `RoutingPlan`; the MoE layer
(`keras_moe.layers.MoE`) only moves tokens to experts by that plan and back.
Adding a routing algorithm means subclassing `Router` and overriding
`compute_routing`; nothing in dispatch or the layer changes.
"""

import collections.abc
from typing import Any
from typing import NamedTuple

import keras
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras import ops

from keras_moe import compat
from keras_moe.validation import check_int
from keras_moe.validation import check_non_negative
from keras_moe.validation import check_rate


class RoutingPlan(NamedTuple):
    """What a router decided for a batch of routing groups.

    All tensors have leading dimensions `(groups, tokens)`: the MoE layer
    routes tokens in groups (for capacity), and a router that does not care
    about groups treats them as a batch. `k` is the number of assignments
    per token (`top_k` for token-choice routers, `E` for Expert Choice).

    Attributes:
        expert_indices: `(G, S, k)` int32, the expert of each assignment,
            best first.
        expert_weights: `(G, S, k)` float32 combine weights.
        dispatch_mask: `(G, S, k)` bool, assignments to compute: False for
            masked tokens, tokens with non-finite router logits, and
            assignments a routing policy dropped (e.g. GShard's random
            second expert). Capacity may drop more.
        router_logits: `(G, S, E)` float32.
        router_probs: `(G, S, E)` float32 scores the losses use.
        priority: optional `(G, S)` float32; under a capacity limit, tokens
            of higher priority are served first within each choice rank
            (batch-prioritized routing). `None`: earlier tokens first.
        slots: optional `(G, S, k)` int32, slots the router already chose
            (`e * capacity + c`, `E * capacity` for none), as Expert Choice
            does; the layer then skips its own capacity assignment.
        capacity: int, slots per expert and group when `slots` is given.
        routed: `(G, S)` bool, tokens the router routed (unmasked, with
            finite logits).
        aux_losses: mapping of unweighted auxiliary losses (float32
            scalars) by name, a dict or `LazyLosses`; the router adds them,
            weighted, in training.
    """

    expert_indices: Any
    expert_weights: Any
    dispatch_mask: Any
    router_logits: Any
    router_probs: Any
    priority: Any = None
    slots: Any = None
    capacity: Any = None
    routed: Any = None
    aux_losses: Any = None

    def __getitem__(self, key):
        # `plan["expert_indices"]`, as the routers' dict results read before.
        if isinstance(key, str):
            return getattr(self, key)
        return tuple.__getitem__(self, key)


class LazyLosses(collections.abc.Mapping):
    """Auxiliary losses computed when first read: a mapping of name to value.

    A router's losses are needed only once the layer's outputs are, but a
    router decides before the experts run. Eager backends issue operators in
    program order, so losses computed in `compute_routing` run before the
    expert matmuls: on a GPU driven by an eager host (PyTorch) the device
    has only the routing's small kernels until the first expert matmul, and
    idles while the host issues them. With `LazyLosses`, `keras_moe.layers.MoE`
    reads the losses after the experts are issued. Each value is computed
    once, from the tensors its function closes over; compiled backends get
    the same graph either way.

    Args:
        functions: dict of name to a function of no arguments returning the
            loss, or to a value (used as is).

    Examples:
        >>> losses = LazyLosses({"z": lambda: 2.0, "load_balance": 1.0})
        >>> sorted(losses), losses["z"]
        (['load_balance', 'z'], 2.0)
    """

    def __init__(self, functions):
        self._functions = dict(functions)
        self._values = {}

    def __getitem__(self, name):
        if name not in self._values:
            value = self._functions[name]
            self._values[name] = value() if callable(value) else value
        return self._values[name]

    def __iter__(self):
        return iter(self._functions)

    def __len__(self):
        return len(self._functions)

    def with_losses(self, functions):
        """These losses and `functions`' (same form as the constructor's), still lazy."""
        merged = {name: (lambda name=name: self[name]) for name in self}
        merged.update(functions)
        return LazyLosses(merged)


@keras.saving.register_keras_serializable(package="keras_moe")
class Router(keras.layers.Layer):
    """Base class of routers: the logits, and what every router shares.

    A router owns the `(hidden, E)` `kernel`, an optional `bias`, the input
    jitter, and its float32 compute dtype (also under mixed precision, so
    that softmax and top-k stay exact). `call` computes
    `logits = x @ kernel (+ bias)` on the routing groups `(G, S, hidden)`,
    marks tokens with non-finite logits as not routable (they neither take
    capacity from other tokens nor enter the losses), and hands the logits to
    `compute_routing`, the one method a subclass overrides. In training it
    then adds the plan's auxiliary losses, each times its weight.

    Loss weights are non-trainable variables (`<name>_loss_weight`), so that
    a callback can change them between steps of a compiled training loop. A
    loss is added only if its weight was non-zero at construction.

    Args:
        num_experts: int >= 1, the number of experts `E`.
        use_bias: bool, a trainable bias on the logits. Defaults to `False`.
        jitter: float in `[0, 1)`; in training the router input is
            multiplied by `uniform(1 - jitter, 1 + jitter)`. Defaults to 0.
        loss_weights: dict of auxiliary-loss name to weight >= 0, for the
            losses this router defines.
        kernel_initializer: initializer of the kernel. Defaults to
            `"glorot_uniform"`.
        seed: optional int seed of the router's randomness.
        **kwargs: standard layer arguments; `dtype` defaults to `"float32"`.
    """

    #: Names of the auxiliary losses this router computes.
    loss_names = ()
    #: Whether plans name their own slots (Expert Choice): the layer then
    #: always groups tokens and skips its capacity assignment.
    names_slots = False
    #: Non-trainable variables added after the first release: `.keras` files
    #: written before them load with these at their initial values.
    added_variables = ()

    def __init__(
        self,
        num_experts,
        use_bias=False,
        jitter=0.0,
        loss_weights=None,
        kernel_initializer="glorot_uniform",
        seed=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, 1)
        self.use_bias = bool(use_bias)
        self.jitter = check_rate("jitter", jitter)
        loss_weights = dict(loss_weights or {})
        unknown = set(loss_weights) - set(self.loss_names)
        if unknown:
            raise ValueError(
                f"`loss_weights` keys must be among {self.loss_names}. "
                f"Received: {sorted(unknown)}"
            )
        self.initial_loss_weights = {
            name: check_non_negative(f"{name}_loss_weight", loss_weights.get(name, 0.0))
            for name in self.loss_names
        }
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def num_selected(self):
        """Assignments per token, `k` (static)."""
        raise NotImplementedError

    def build(self, input_shape):
        hidden = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel", shape=(hidden, self.num_experts), initializer=self.kernel_initializer
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.num_experts,), initializer="zeros")
        self.build_state(input_shape)
        self.loss_weights = {
            name: self.add_weight(
                name=f"{name}_loss_weight",
                shape=(),
                initializer=keras.initializers.Constant(value),
                trainable=False,
            )
            for name, value in self.initial_loss_weights.items()
        }

    def _clear_losses(self):
        # Keras clears a layer's losses in place (`list.clear()`) at the start
        # of every outermost call. Under torch.compile (Keras'
        # `jit_compile=True` on PyTorch) that read of the list makes dynamo
        # guard on the previous step's loss tensor, which is freed by the
        # next step: the training step recompiled on every call. A fresh
        # list is not read, so the compiled step is reused.
        if keras.backend.backend() == "torch" and not in_stateless_scope():
            self._losses = []
            self._loss_ids = set()
            for layer in self._layers:
                layer._clear_losses()
            return
        super()._clear_losses()

    def build_state(self, input_shape):
        """Creates subclass variables (before the loss weights)."""

    def call(self, inputs, token_mask=None, training=None, defer_losses=False):
        """Routes `inputs (G, S, hidden)`; `token_mask (G, S)` marks real tokens.

        In training the plan's auxiliary losses are added, each times its
        weight, unless `defer_losses`: then the caller adds them with
        `add_aux_losses(plan)` during the same call of the model (the MoE
        layer does, after issuing its experts).

        Returns a `RoutingPlan`.
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
        logits = ops.matmul(x, self.kernel)  # (G, S, E)
        if self.bias is not None:
            logits = logits + self.bias
        routed = ops.all(ops.isfinite(logits), axis=-1)  # (G, S)
        if token_mask is not None:
            routed = ops.logical_and(routed, ops.cast(token_mask, "bool"))
        plan = self.compute_routing(x, logits, routed, training)
        if plan.routed is None:
            plan = plan._replace(routed=routed)
        if training and not defer_losses:
            self.add_aux_losses(plan)
        return plan

    def add_aux_losses(self, plan):
        """Adds `plan`'s auxiliary losses of non-zero initial weight, each times its weight.

        Losses of weight 0 are not read (a `LazyLosses` does not compute them).
        """
        aux_losses = plan.aux_losses or {}
        for name in aux_losses:
            if self.initial_loss_weights.get(name, 0.0) > 0:
                self.add_loss(self.loss_weights[name] * aux_losses[name])

    def compute_routing(self, inputs, logits, routed, training):
        """Decides the routing; the one method a router subclass overrides.

        Args:
            inputs: `(G, S, hidden)` router input in the router's dtype
                (jittered in training).
            logits: `(G, S, E)` router logits.
            routed: `(G, S)` bool, tokens to route: unmasked, finite logits.
                Assignments of other tokens must have `dispatch_mask` False,
                and those tokens must be left out of the losses.
            training: bool.

        Returns:
            A `RoutingPlan`.
        """
        raise NotImplementedError

    def load_own_variables(self, store):
        compat.load_own_variables(self, store, self.added_variable_names())

    def added_variable_names(self):
        return tuple(self.added_variables) + tuple(
            f"{name}_loss_weight" for name in self.loss_names
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "use_bias": self.use_bias,
                "jitter": self.jitter,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "seed": self.seed,
            }
        )
        return config
