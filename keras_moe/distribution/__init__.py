"""Expert parallelism on Keras' distribution API (JAX) and TensorFlow DTensor.

- `layout_map(device_mesh, expert_axis, model_axis)`: a
  `keras.distribution.LayoutMap` splitting every expert variable over the
  expert axis of a `keras.distribution.DeviceMesh`.
- `expert_parallel(device_mesh, expert_axis, batch_axis)`: the
  `keras.distribution.ModelParallel` that uses it; under it the layers
  exchange tokens between devices (an all-to-all) instead of gathering
  expert weights.
- `dtensor_layouts(model, mesh)`: the same plan as TensorFlow DTensor
  layouts; `dtensor_variables` places a built model's variables with them.
- `shard_groups` / `shard_experts` / `per_group`: what the layers do with
  their capacity buffers under it (no-ops without an expert-parallel
  distribution), for custom layers.
"""

from keras_moe.distribution.dtensor import dtensor_layouts
from keras_moe.distribution.dtensor import dtensor_variables
from keras_moe.distribution.layouts import EXCHANGES
from keras_moe.distribution.layouts import RULES
from keras_moe.distribution.layouts import ExpertLayoutMap
from keras_moe.distribution.layouts import ExpertParallel
from keras_moe.distribution.layouts import expert_parallel
from keras_moe.distribution.layouts import layout_map
from keras_moe.distribution.sharding import ExpertSharding
from keras_moe.distribution.sharding import active
from keras_moe.distribution.sharding import per_group
from keras_moe.distribution.sharding import shard_experts
from keras_moe.distribution.sharding import shard_groups

__all__ = [
    "EXCHANGES",
    "RULES",
    "ExpertLayoutMap",
    "ExpertParallel",
    "ExpertSharding",
    "active",
    "dtensor_layouts",
    "dtensor_variables",
    "expert_parallel",
    "layout_map",
    "per_group",
    "shard_experts",
    "shard_groups",
]
