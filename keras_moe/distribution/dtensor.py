"""The expert-parallel plan as TensorFlow DTensor layouts.

Keras 3's TensorFlow distribution backend is a prototype (its
`distribute_value` is unimplemented), so `keras.distribution` cannot place
variables on TensorFlow. DTensor can: `dtensor_layouts` renders the rules of
`layout_map` as `tf.experimental.dtensor.Layout`s, `dtensor_variables` puts a
built model's variables on the mesh with them, and running the model's
layers inside `keras.StatelessScope(state_mapping=...)` computes with those
sharded `DVariable`s (see the "Scaling out" docs page).
"""

from keras_moe.distribution.layouts import check_variable_layout
from keras_moe.distribution.layouts import match_rule


def _dtensor():
    from tensorflow.experimental import dtensor

    return dtensor


def dtensor_layouts(model, mesh, expert_axis="expert", model_axis=None):
    """DTensor layouts of a built model's variables, by variable path.

    Expert variables are split as `layout_map` splits them (leading expert
    dimension over `expert_axis`, width over `model_axis`); every other
    variable is replicated.

    Args:
        model: a built Keras model or layer.
        mesh: a `tf.experimental.dtensor.Mesh`.
        expert_axis: str, the mesh dimension experts are split over.
            Defaults to `"expert"`.
        model_axis: str or `None`, a mesh dimension for the experts' width.
            Defaults to `None`.

    Returns:
        A dict from each variable's path to its
        `tf.experimental.dtensor.Layout`.

    Raises:
        ValueError: an axis not in the mesh, or a `num_experts` (or width)
            the mesh does not divide (the message names the layer and both
            numbers).

    Examples:
    ```python
    from tensorflow.experimental import dtensor
    mesh = dtensor.create_mesh([("batch", 2), ("expert", 4)], device_type="CPU")
    layouts = keras_moe.distribution.dtensor_layouts(model, mesh)
    layouts["sparse_mo_e/experts/up_kernel"].sharding_specs
    # ['expert', 'unsharded', 'unsharded']
    ```
    """
    dtensor = _dtensor()
    names = list(mesh.dim_names)
    for argument, axis in (("expert_axis", expert_axis), ("model_axis", model_axis)):
        if axis is not None and axis not in names:
            raise ValueError(
                f"`{argument}` must be one of the mesh dimensions {tuple(names)}. "
                f"Received: {argument}={axis!r}"
            )
    sizes = {name: mesh.dim_size(name) for name in names}
    layouts = {}
    for variable in model.variables:
        rank = len(variable.shape)
        axes = match_rule(variable.path, expert_axis, model_axis)
        if axes is None:
            layouts[variable.path] = dtensor.Layout.replicated(mesh, rank)
            continue
        check_variable_layout(variable.path, variable.shape, axes, sizes, expert_axis)
        specs = [dtensor.UNSHARDED if axis is None else axis for axis in axes]
        layouts[variable.path] = dtensor.Layout(specs, mesh)
    return layouts


def dtensor_variables(model, layouts):
    """The model's variables copied onto the mesh as `DVariable`s.

    Args:
        model: a built Keras model or layer (TensorFlow backend).
        layouts: the dict of `dtensor_layouts`.

    Returns:
        A dict from each variable's path to a
        `tf.experimental.dtensor.DVariable` holding its value in its layout:
        each device stores only its shard of the expert variables.
    """
    import tensorflow as tf

    dtensor = _dtensor()
    variables = {}
    for variable in model.variables:
        layout = layouts[variable.path]
        value = tf.convert_to_tensor(variable.value)
        replicated = dtensor.copy_to_mesh(value, dtensor.Layout.replicated(layout.mesh, layout.rank))
        variables[variable.path] = dtensor.DVariable(
            dtensor.relayout(replicated, layout), trainable=variable.trainable
        )
    return variables
