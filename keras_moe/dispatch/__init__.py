"""Dispatchers move tokens to experts and back; they decide nothing.

- `capacity`: per-group capacity buffers `(groups, E, C, hidden)`; first
  choices are served before second choices, earlier (or higher-priority)
  tokens first; slot assignment, gather and combine are separate steps so
  that routers naming their own slots (Expert Choice) reuse them.
- `dropless`: every assignment computed; rows sorted by expert into
  per-expert blocks (`blocks`), then a backend grouped matmul, a scan of
  dense matmuls or one batched einsum (`default_strategy`).
"""

from keras_moe.dispatch.blocks import from_blocks
from keras_moe.dispatch.blocks import to_blocks
from keras_moe.dispatch.capacity import capacity_slots
from keras_moe.dispatch.capacity import combine_slots
from keras_moe.dispatch.capacity import compute_capacity
from keras_moe.dispatch.capacity import dispatch_to_slots
from keras_moe.dispatch.capacity import dispatch_with_capacity
from keras_moe.dispatch.capacity import gather_slots
from keras_moe.dispatch.capacity import slot_sources
from keras_moe.dispatch.dropless import STRATEGIES
from keras_moe.dispatch.dropless import default_strategy
from keras_moe.dispatch.dropless import dispatch_dropless
from keras_moe.dispatch.dropless import sort_by_expert
