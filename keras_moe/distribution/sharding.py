"""The active expert-parallel plan, as the layers see it.

Layers ask `active()` whether an expert-parallel distribution is set; if so
they keep their capacity buffers in the GShard layout (`shard_groups`,
`shard_experts`) and run dropless dispatch through the token exchange of
`keras_moe.backend.expert_parallel`. Without one (or on a backend without a
Keras distribution: TensorFlow, PyTorch), every function here is a no-op.
"""

import math
from typing import NamedTuple

import keras

from keras_moe.distribution.layouts import ExpertLayoutMap
from keras_moe.distribution.layouts import ExpertParallel


class ExpertSharding(NamedTuple):
    """The mesh axes an expert-parallel distribution uses.

    Attributes:
        device_mesh: the `keras.distribution.DeviceMesh`.
        expert_axis: mesh axis the experts are split over.
        batch_axis: mesh axis the batch is split over (may be `expert_axis`).
        model_axis: mesh axis of the experts' width, or `None`.
        exchange: `None`, `"all_to_all"` or `"ragged_all_to_all"`.
    """

    device_mesh: object
    expert_axis: str
    batch_axis: str
    model_axis: object = None
    exchange: object = None

    def axis_size(self, name):
        return self.device_mesh.shape[list(self.device_mesh.axis_names).index(name)]

    @property
    def token_axes(self):
        """Mesh axes the tokens of an MoE layer are split over.

        The batch axis, then the expert axis: inside the layer each device of
        an expert group takes its own share of the tokens it holds, so that
        dispatch is an all-to-all over the expert axis.
        """
        if self.batch_axis == self.expert_axis:
            return (self.expert_axis,)
        return (self.batch_axis, self.expert_axis)

    @property
    def token_shards(self):
        return math.prod(self.axis_size(axis) for axis in self.token_axes)

    @property
    def expert_shards(self):
        return self.axis_size(self.expert_axis)


def active():
    """The `ExpertSharding` of the current distribution, or `None`.

    An `ExpertParallel` distribution (from `expert_parallel`), or a
    `keras.distribution.ModelParallel` built on an `ExpertLayoutMap`, on the
    JAX backend (Keras' distribution API runs on JAX only).
    """
    if keras.backend.backend() != "jax":
        return None
    distribution = keras.distribution.distribution()
    if isinstance(distribution, ExpertParallel):
        return ExpertSharding(
            distribution.device_mesh,
            distribution.expert_axis,
            distribution.batch_axis,
            distribution.model_axis,
            distribution.exchange,
        )
    layouts = getattr(distribution, "_layout_map", None)
    if isinstance(distribution, keras.distribution.ModelParallel) and isinstance(
        layouts, ExpertLayoutMap
    ):
        return ExpertSharding(
            distribution.device_mesh,
            layouts.expert_axis,
            distribution.batch_dim_name,
            layouts.model_axis,
        )
    return None


def _constrain(tensor, axes):
    from keras_moe.backend import expert_parallel

    return expert_parallel.constrain(tensor, axes, active().device_mesh)


def _divides(shards, size):
    return isinstance(size, int) and size % shards == 0


def shard_groups(tensor):
    """Splits routing groups `(groups, ...)` over the token axes.

    Each device then routes and fills the capacity buffers of its own
    groups. A no-op without an expert-parallel distribution, or when the
    number of groups is not a multiple of the devices holding tokens (the
    computation is then left to the compiler, still correct).
    """
    sharding = active()
    if sharding is None or not _divides(sharding.token_shards, tensor.shape[0]):
        return tensor
    axes = (sharding.token_axes,) + (None,) * (len(tensor.shape) - 1)
    return _constrain(tensor, axes)


def shard_experts(tensor):
    """Splits capacity buffers `(groups, E, C, hidden)` over the expert axis.

    Going from `shard_groups` to this layout is the GShard all-to-all that
    sends each token to the devices of its expert; going back returns the
    expert outputs. With separate batch and expert axes the groups stay
    split over the batch axis. A no-op without an expert-parallel
    distribution or when the mesh does not divide the buffer.
    """
    sharding = active()
    if sharding is None or not _divides(sharding.expert_shards, tensor.shape[1]):
        return tensor
    batch = None
    if sharding.batch_axis != sharding.expert_axis and _divides(
        sharding.axis_size(sharding.batch_axis), tensor.shape[0]
    ):
        batch = sharding.batch_axis
    axes = (batch, sharding.expert_axis) + (None,) * (len(tensor.shape) - 2)
    return _constrain(tensor, axes)


def per_group(fn, num_groups):
    """`fn(*group_major_arrays)` run by each device on its own groups.

    `fn` takes and returns arrays whose leading axis is the routing group;
    the dispatch steps (`capacity_slots`, `gather_slots`, `combine_slots`)
    are such functions. Under an expert-parallel distribution each device
    computes them for its groups only; otherwise `fn` itself.
    """
    sharding = active()
    if sharding is None or not isinstance(num_groups, int):
        return fn
    from keras_moe.backend import expert_parallel

    return expert_parallel.per_group(fn, sharding, num_groups)
