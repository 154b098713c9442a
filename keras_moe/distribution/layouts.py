"""Where expert variables live on a device mesh: one table of layout rules.

Every rule pairs a regular expression over Keras variable paths (matched in
full, as `keras.distribution.LayoutMap` does since Keras 3.14) with the
sharding of that variable's dimensions: `"expert"` marks the dimension
split over the expert axis of the mesh, `"model"` the one split over the
model axis (expert-tensor parallelism; unsharded without a model axis).
The rules name variables by their last path segments, so any layer that
holds its experts in a `StackedExperts` (or a `StackedMLP`) sublayer whose
name ends in `experts` is covered without a rule of its own: `SparseMoE`,
`SwitchFFN`, `MoE`, Expert Choice and Soft MoE layers, `MMoE` / `CGC` /
`PLE`. The same table renders Keras `TensorLayout`s (`layout_map`) and
TensorFlow DTensor layouts (`dtensor_layouts`).
"""

import re

import keras

from keras_moe.validation import check_choice

EXPERT = "expert"
MODEL = "model"

# The segment before the variable name: a sublayer called `experts`,
# `stacked_experts`, `stacked_experts_2` (Keras numbers repeated automatic
# names), `moe_experts`, ... (but not `shared_expert`).
_STACK = r"(?:.*/)?[^/]*experts(?:_\d+)?/"

#: `(name, regex over variable paths, sharding of each dimension)`.
RULES = (
    # keras_moe.experts.StackedExperts: kernels (E, in, out), biases (E, out).
    ("stacked experts: up/gate kernels", _STACK + r"(?:up|gate)_kernel", (EXPERT, None, MODEL)),
    ("stacked experts: down kernel", _STACK + r"down_kernel", (EXPERT, MODEL, None)),
    ("stacked experts: up/gate biases", _STACK + r"(?:up|gate)_bias", (EXPERT, MODEL)),
    ("stacked experts: down bias", _STACK + r"down_bias", (EXPERT, None)),
    # StackedMLP experts of MMoE / CGC / PLE: kernel_i (E, in, out), bias_i (E, out).
    ("multi-task experts: kernels", _STACK + r"kernel_\d+", (EXPERT, None, None)),
    ("multi-task experts: biases", _STACK + r"bias_\d+", (EXPERT, None)),
    # The always-on shared expert (FeedForward): its width over the model axis.
    ("shared expert: up/gate kernels", r"(?:.*/)?shared_expert/(?:up|gate)_kernel", (None, MODEL)),
    ("shared expert: down kernel", r"(?:.*/)?shared_expert/down_kernel", (MODEL, None)),
    # keras-hub 0.32 MoE blocks. Only the expert dimension is sharded: some
    # of these kernels hold gate and up projections fused on their last axis
    # (Qwen-MoE, GPT-OSS), which a split of the width would cut apart.
    (
        "keras-hub Mixtral / Qwen-MoE / Qwen3-MoE / Qwen3.5-MoE experts",
        r"(?:.*/)?experts/expert_feedforward_(?:gate|intermediate|output)_dense",
        (EXPERT, None, None),
    ),
    ("keras-hub GPT-OSS experts: kernels", r"(?:.*/)?experts/(?:gate_up_proj|down_proj)", (EXPERT, None, None)),
    ("keras-hub GPT-OSS experts: biases", r"(?:.*/)?experts/(?:gate_up_proj|down_proj)_bias", (EXPERT, None)),
    ("keras-hub Gemma4 experts: kernels", r"(?:.*/)?moe_expert_bank/(?:gate|up|down)_proj", (EXPERT, None, None)),
    ("keras-hub Gemma4 experts: scales", r"(?:.*/)?moe_expert_bank/per_expert_scale", (EXPERT,)),
    # keras-hub shared experts (Qwen-MoE, Qwen3.5-MoE): Dense kernels.
    (
        "keras-hub shared expert: gate/intermediate kernels",
        r"(?:.*/)?shared_expert(?:_dense)?/feedforward_(?:gate|intermediate)_dense/kernel",
        (None, MODEL),
    ),
    (
        "keras-hub shared expert: output kernel",
        r"(?:.*/)?shared_expert(?:_dense)?/feedforward_output_dense/kernel",
        (MODEL, None),
    ),
)


def _check_axis(device_mesh, name, value):
    check_choice(name, value, tuple(device_mesh.axis_names))
    return value


def rule_axes(axes, expert_axis, model_axis):
    """A rule's dimension shardings as mesh axis names (`None`: unsharded)."""
    names = {EXPERT: expert_axis, MODEL: model_axis}
    return tuple(names.get(axis) for axis in axes)


def resolved_rules(expert_axis, model_axis=None):
    """`(regex, axes)` of the rules that shard something on this mesh."""
    rules = []
    for _, pattern, axes in RULES:
        axes = rule_axes(axes, expert_axis, model_axis)
        if any(axis is not None for axis in axes):
            rules.append((pattern, axes))
    return rules


def match_rule(path, expert_axis, model_axis=None):
    """The mesh axes of the variable at `path`, or `None` (replicated)."""
    for pattern, axes in resolved_rules(expert_axis, model_axis):
        if re.fullmatch(pattern, path):
            return axes
    return None


def check_variable_layout(path, shape, axes, axis_sizes, expert_axis=None):
    """Raises a `ValueError` unless `axes` can shard a variable of `shape`.

    Args:
        path: the variable's path, e.g. `"sparse_mo_e/experts/up_kernel"`.
        shape: its shape.
        axes: mesh axis name (or `None`) per dimension.
        axis_sizes: dict from mesh axis name to its number of devices.
        expert_axis: the expert axis; a split of dimension 0 over it is
            reported as `num_experts`.
    """
    shape = tuple(shape)
    layer = path.rsplit("/", 1)[0]
    if len(axes) != len(shape):
        raise ValueError(
            f"Layer '{layer}': the expert layout {axes} has {len(axes)} dimensions but the "
            f"variable '{path}' has shape {shape}. The path matched an expert-variable rule of "
            "keras_moe.distribution.layout_map; rename the layer or remove that key from the "
            "layout map."
        )
    for dim, axis in enumerate(axes):
        if axis is None or shape[dim] is None:
            continue
        size = axis_sizes[axis]
        if shape[dim] % size:
            what = "num_experts" if dim == 0 and axis == expert_axis else f"dimension {dim}"
            raise ValueError(
                f"Layer '{layer}': {what}={shape[dim]} is not divisible by the {size} devices "
                f"of mesh axis '{axis}' (variable '{path}', shape {shape}). Use a number of "
                f"experts divisible by {size} or a mesh whose '{axis}' axis divides {shape[dim]}."
            )


class ExpertLayoutMap(keras.distribution.LayoutMap):
    """A `keras.distribution.LayoutMap` that knows its expert and model axes.

    Made by `layout_map`; behaves exactly like a `LayoutMap` (more keys may
    be added), and lets the layers find the expert axis of the mesh.
    """

    def __init__(self, device_mesh, expert_axis, model_axis=None):
        super().__init__(device_mesh)
        self.expert_axis = expert_axis
        self.model_axis = model_axis

    def axis_sizes(self):
        mesh = self.device_mesh
        return dict(zip(mesh.axis_names, mesh.shape))


def layout_map(device_mesh, expert_axis="expert", model_axis=None):
    """A `keras.distribution.LayoutMap` that shards every expert variable.

    Stacked expert kernels and biases are split on their leading expert
    dimension over the `expert_axis` of `device_mesh`: those of `SparseMoE`,
    `SwitchFFN`, `MoE` with `StackedExperts` (so Expert Choice and Soft MoE
    layers too), the stacked experts of `MMoE` / `CGC` / `PLE`, and the
    expert weights of keras-hub's MoE blocks (Mixtral, Qwen-MoE, Qwen3-MoE,
    Qwen3.5-MoE, GPT-OSS, Gemma4). With `model_axis`, the experts' hidden
    width is split over it as well (expert-tensor parallelism: up/gate
    kernels on their output, down kernels on their input dimension), and
    so is the width of the shared experts. Routers, `expert_bias` and
    every other variable stay replicated.

    The keys are full-match regular expressions over variable paths
    (`.*experts/(?:up|gate)_kernel`, ...), so new layers built from
    `StackedExperts` are covered without new keys. The map is an ordinary
    `LayoutMap`: more keys may be added, as long as no path matches two.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`.
        expert_axis: str, the mesh axis the experts are split over.
            Defaults to `"expert"`.
        model_axis: str or `None`, a second mesh axis for the experts'
            width. Defaults to `None`.

    Returns:
        An `ExpertLayoutMap` (a `keras.distribution.LayoutMap`).

    Examples:
        >>> import keras
        >>> import keras_moe
        >>> mesh = keras.distribution.DeviceMesh(
        ...     (2, 4), ["batch", "expert"], devices=[f"cpu:{i}" for i in range(8)])
        >>> layouts = keras_moe.distribution.layout_map(mesh)
        >>> layouts["sparse_mo_e/experts/up_kernel"].axes
        ('expert', None, None)
        >>> layouts["sparse_mo_e/router/kernel"] is None  # replicated
        True

    References:
        - [Lepikhin et al., 2020 (GShard)](https://arxiv.org/abs/2006.16668)
        - Keras distribution API: `keras.distribution.LayoutMap`.
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            "`device_mesh` must be a keras.distribution.DeviceMesh. "
            f"Received: device_mesh={device_mesh!r}"
        )
    _check_axis(device_mesh, "expert_axis", expert_axis)
    if model_axis is not None:
        _check_axis(device_mesh, "model_axis", model_axis)
        if model_axis == expert_axis:
            raise ValueError(
                "`model_axis` must differ from `expert_axis`. "
                f"Received: expert_axis={expert_axis!r}, model_axis={model_axis!r}"
            )
    layouts = ExpertLayoutMap(device_mesh, expert_axis, model_axis)
    for pattern, axes in resolved_rules(expert_axis, model_axis):
        layouts[pattern] = axes
    return layouts


EXCHANGES = ("all_to_all", "ragged_all_to_all")


class ExpertParallel(keras.distribution.ModelParallel):
    """Expert parallelism: a `keras.distribution.ModelParallel` for MoE models.

    Variables follow an `ExpertLayoutMap` (experts split over its expert
    axis, everything else replicated), the input batch is split over
    `batch_axis`, and the keras_moe layers built under it exchange tokens
    between the devices that own their experts (see the "Scaling out"
    docs page). Checks, as each variable is created, that the mesh divides
    what the layout splits: a `num_experts` not divisible by the expert
    axis raises a `ValueError` naming the layer and both numbers.

    Made by `expert_parallel`.

    Args:
        layout_map: an `ExpertLayoutMap` (from `layout_map`).
        batch_axis: str, the mesh axis the batch is split over; may be the
            expert axis. Defaults to `"batch"`.
        exchange: how dropless layers move tokens between devices (JAX):
            `"all_to_all"` (fixed-size buffers, every platform),
            `"ragged_all_to_all"` (only the routed rows; GPU/TPU) or `None`
            (the ragged exchange where the platform supports it). Defaults
            to `None`.
        auto_shard_dataset: bool, as in `ModelParallel`. Defaults to `True`.
    """

    def __init__(self, layout_map, batch_axis="batch", exchange=None, auto_shard_dataset=True):
        if not isinstance(layout_map, ExpertLayoutMap):
            raise ValueError(
                "`layout_map` must come from keras_moe.distribution.layout_map. "
                f"Received: layout_map={layout_map!r}"
            )
        _check_axis(layout_map.device_mesh, "batch_axis", batch_axis)
        if exchange is not None:
            check_choice("exchange", exchange, EXCHANGES)
        super().__init__(
            layout_map=layout_map, batch_dim_name=batch_axis, auto_shard_dataset=auto_shard_dataset
        )
        self.expert_layout_map = layout_map
        self.exchange = exchange

    @property
    def expert_axis(self):
        return self.expert_layout_map.expert_axis

    @property
    def model_axis(self):
        return self.expert_layout_map.model_axis

    @property
    def batch_axis(self):
        return self.batch_dim_name

    def get_variable_layout(self, variable):
        layout = super().get_variable_layout(variable)
        if getattr(variable, "_layout", None) is None and self.expert_layout_map[variable.path]:
            check_variable_layout(
                variable.path,
                variable.shape,
                layout.axes,
                self.expert_layout_map.axis_sizes(),
                self.expert_axis,
            )
        return layout

    def __repr__(self):
        return (
            f"<{self.__class__.__name__} device_mesh={self.device_mesh}, "
            f"expert_axis={self.expert_axis!r}, batch_axis={self.batch_axis!r}, "
            f"model_axis={self.model_axis!r}>"
        )


def expert_parallel(
    device_mesh,
    expert_axis="expert",
    batch_axis="batch",
    model_axis=None,
    exchange=None,
    auto_shard_dataset=True,
):
    """A `keras.distribution.ModelParallel` for expert parallelism.

    Experts are split over `expert_axis` (with `layout_map`), the batch over
    `batch_axis`. The two may name the same mesh axis: tokens and experts
    over the same devices, the usual layout (a 1-D mesh). With different
    axes, say a `(2, 4)` `("batch", "expert")` mesh, each expert lives on the
    two devices of its `"expert"` column and the MoE layers split the tokens
    of a batch shard over the four devices of its row before exchanging them.

    Set it with `keras.distribution.set_distribution(...)` or use its
    `.scope()` while building a model: every expert variable is then created
    directly on its devices, and training steps move tokens to the experts
    (an all-to-all) instead of gathering expert weights.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`.
        expert_axis: str, the mesh axis experts are split over. Defaults to
            `"expert"`.
        batch_axis: str, the mesh axis the batch is split over; may equal
            `expert_axis`. Defaults to `"batch"`.
        model_axis: str or `None`, an axis for the experts' width
            (expert-tensor parallelism). Defaults to `None`.
        exchange: `None`, `"all_to_all"` or `"ragged_all_to_all"`: how
            dropless layers move tokens (see `ExpertParallel`). Defaults to
            `None`.
        auto_shard_dataset: bool, as in `ModelParallel`. Defaults to `True`.

    Returns:
        An `ExpertParallel` (a `keras.distribution.ModelParallel`).

    Examples:
        >>> import keras
        >>> import keras_moe
        >>> mesh = keras.distribution.DeviceMesh(
        ...     (8,), ["expert"], devices=[f"cpu:{i}" for i in range(8)])
        >>> distribution = keras_moe.distribution.expert_parallel(
        ...     mesh, expert_axis="expert", batch_axis="expert")
        >>> distribution.batch_dim_name
        'expert'

    References:
        - [Lepikhin et al., 2020 (GShard)](https://arxiv.org/abs/2006.16668)
        - [Fedus et al., 2021 (Switch)](https://arxiv.org/abs/2101.03961)
    """
    layouts = layout_map(device_mesh, expert_axis=expert_axis, model_axis=model_axis)
    return ExpertParallel(
        layouts, batch_axis=batch_axis, exchange=exchange, auto_shard_dataset=auto_shard_dataset
    )
