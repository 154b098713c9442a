"""The few backend-specific fast paths, each behind one function.

Everything else in keras_moe is written with `keras.ops`. A function here
returns `None` (or reports unavailable) where no fast path applies, and the
caller uses its portable version instead; tests check that both agree.
"""

from keras_moe.backend.constants import as_tensor
from keras_moe.backend.constants import count_ids
from keras_moe.backend.constants import scalar_like
from keras_moe.backend.constants import segment_sum
from keras_moe.backend.eager import eager_jit
from keras_moe.backend.expert_ffn import expert_ffn
from keras_moe.backend.gradients import custom_gradient
from keras_moe.backend.gradients import vjp
from keras_moe.backend.grouped_matmul import grouped_matmul
from keras_moe.backend.grouped_matmul import grouped_outer
from keras_moe.backend.grouped_matmul import cuda_capability
from keras_moe.backend.grouped_matmul import has_grouped_matmul
from keras_moe.backend.grouped_matmul import has_pallas_grouped_matmul
from keras_moe.backend.grouped_matmul import keep_only_matmuls
from keras_moe.backend.grouped_matmul import on_accelerator
from keras_moe.backend.inplace import add_rows
from keras_moe.backend.inplace import after
from keras_moe.backend.inplace import eager_shapes
from keras_moe.backend.inplace import host_ints
from keras_moe.backend.inplace import write_slice
from keras_moe.backend.plan import plan_tables
from keras_moe.backend.rows import gather_rows
from keras_moe.backend.rows import split_rows
from keras_moe.backend.expert_parallel import dropless as expert_parallel_dropless
