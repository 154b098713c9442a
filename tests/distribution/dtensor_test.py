"""TensorFlow DTensor: the expert plan as layouts, run on 8 logical CPUs.

Runs in its own process (`KERAS_MOE_TF_LOGICAL_CPUS=8`, see conftest.py).
"""

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe import dispatch

pytestmark = [
    pytest.mark.multi_device,
    pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="DTensor is TensorFlow's"),
]


def dtensor_mesh():
    from tensorflow.experimental import dtensor

    return dtensor.create_mesh([("batch", 2), ("expert", 4)], device_type="CPU")


def test_layouts_follow_the_layout_map():
    from tensorflow.experimental import dtensor

    layer = keras_moe.layers.SparseMoE(8, 16, gated=True, use_bias=True, name="moe")
    layer.build((None, 8))
    layouts = keras_moe.distribution.dtensor_layouts(layer, dtensor_mesh())
    assert set(layouts) == {v.path for v in layer.variables}
    assert layouts["moe/experts/up_kernel"].sharding_specs == ["expert", dtensor.UNSHARDED, dtensor.UNSHARDED]
    assert layouts["moe/experts/down_bias"].sharding_specs == ["expert", dtensor.UNSHARDED]
    assert layouts["moe/router/kernel"].is_fully_replicated()
    with pytest.raises(ValueError, match="`expert_axis` must be one of the mesh dimensions"):
        keras_moe.distribution.dtensor_layouts(layer, dtensor_mesh(), expert_axis="experts")
    odd = keras_moe.layers.SparseMoE(6, 16, name="odd")
    odd.build((None, 8))
    with pytest.raises(ValueError, match=r"'odd/experts': num_experts=6 .* 4 devices"):
        keras_moe.distribution.dtensor_layouts(odd, dtensor_mesh())


def test_sparse_moe_experts_run_as_sharded_dvariables():
    """Routing and slot assignment as usual, the experts' computation on the
    mesh with their kernels as DVariables of which each device stores its
    share: the layer's output is the single-device one."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    mesh = dtensor_mesh()
    layer = keras_moe.layers.SparseMoE(
        8, 16, gated=True, use_bias=True, capacity_factor=2.0, group_size=4, name="moe"
    )
    x = np.random.default_rng(0).normal(size=(8, 4, 8)).astype("float32")
    want = np.asarray(layer(x))

    layouts = keras_moe.distribution.dtensor_layouts(layer, mesh)
    variables = keras_moe.distribution.dtensor_variables(layer, layouts)
    experts = layer.experts
    kernel = variables["moe/experts/up_kernel"]
    assert isinstance(kernel, dtensor.DVariable)
    assert dtensor.fetch_layout(kernel).sharding_specs[0] == "expert"
    # Each device stores 2 of the 8 experts.
    local = dtensor.unpack(tf.convert_to_tensor(kernel))
    assert len(local) == 8 and all(t.shape == (2, 8, 16) for t in local)

    # The capacity buffers, laid out groups over "batch", experts over "expert".
    groups = tf.reshape(tf.constant(x), (-1, 4, 8))  # (G, S, hidden)
    plan = layer.router(groups)
    capacity = dispatch.compute_capacity(2.0, 4, 2, 8)
    slots, dispatched = dispatch.capacity_slots(plan.expert_indices, plan.dispatch_mask, 8, capacity)
    buffer = dispatch.gather_slots(groups, slots, 8, capacity)  # (G, E, C, hidden)
    buffer_layout = dtensor.Layout(["batch", "expert", dtensor.UNSHARDED, dtensor.UNSHARDED], mesh)
    on_mesh = dtensor.relayout(
        dtensor.copy_to_mesh(buffer, dtensor.Layout.replicated(mesh, 4)), buffer_layout
    )
    mapping = [(v, variables[v.path]) for v in experts.variables if v.path in variables]

    @tf.function
    def run_experts(buffer):
        with keras.StatelessScope(state_mapping=mapping):
            return experts(buffer)

    y = run_experts(on_mesh)
    assert dtensor.fetch_layout(y).sharding_specs[:2] == ["batch", "expert"]
    # 8 groups over 2 batch devices, 8 experts over 4 expert devices.
    assert all(t.shape == (4, 2, capacity, 8) for t in dtensor.unpack(y))
    y = dtensor.unpack(dtensor.relayout(y, dtensor.Layout.replicated(mesh, 4)))[0]
    got = dispatch.combine_slots(y, slots, plan.expert_weights, dispatched)
    np.testing.assert_allclose(np.reshape(np.asarray(got), x.shape), want, atol=1e-5, rtol=0)
