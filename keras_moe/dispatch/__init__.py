"""Dispatchers move tokens to experts and back; they decide nothing.

- `capacity`: per-group capacity buffers `(groups, E, C, hidden)`; first
  choices are served before second choices, earlier (or higher-priority)
  tokens first; slot assignment, gather and combine are separate steps so
  that routers naming their own slots (Expert Choice) reuse them.
- `dropless`: every assignment computed, as per-expert rows (`blocks`: the
  layout and the two data moves, `gather_rows` / `combine_rows`) through
  grouped matmuls fused with those moves (`grouped`), by one of
  `STRATEGIES` (`default_strategy`).
"""

from keras_moe.dispatch.blocks import RowPlan
from keras_moe.dispatch.blocks import block_size_for
from keras_moe.dispatch.blocks import combine_rows
from keras_moe.dispatch.blocks import from_blocks
from keras_moe.dispatch.blocks import gather_rows
from keras_moe.dispatch.blocks import plan_rows
from keras_moe.dispatch.blocks import row_weights
from keras_moe.dispatch.blocks import sort_by_expert
from keras_moe.dispatch.blocks import to_blocks
from keras_moe.dispatch.capacity import capacity_slots
from keras_moe.dispatch.capacity import combine_slots
from keras_moe.dispatch.capacity import compute_capacity
from keras_moe.dispatch.capacity import dispatch_to_slots
from keras_moe.dispatch.capacity import dispatch_with_capacity
from keras_moe.dispatch.capacity import gather_slots
from keras_moe.dispatch.capacity import slot_sources
from keras_moe.dispatch.dropless import default_strategy
from keras_moe.dispatch.dropless import describe_strategy
from keras_moe.dispatch.dropless import dispatch_dropless
from keras_moe.dispatch.grouped import STRATEGIES
from keras_moe.dispatch.grouped import gather_matmul
from keras_moe.dispatch.grouped import matmul_combine
from keras_moe.dispatch.grouped import matmul_rows
from keras_moe.dispatch.grouped import outer_rows
