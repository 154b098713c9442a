"""Layers built from routers, dispatchers and experts."""

from keras_moe.layers.expert_choice_moe import ExpertChoiceMoE
from keras_moe.layers.moe import MoE
from keras_moe.layers.soft_moe import SoftMoE
from keras_moe.layers.sparse_moe import SparseMoE
from keras_moe.layers.switch_ffn import SwitchFFN

# Multi-task mixtures (MMoE / CGC / PLE).
from keras_moe.layers.cgc import CGC
from keras_moe.layers.mmoe import MMoE
from keras_moe.layers.ple import PLE

# Transformer blocks with a routed feed-forward (keras-hub's blocks).
from keras_moe.layers.moe_transformer import MoETransformerDecoder
from keras_moe.layers.moe_transformer import MoETransformerEncoder
