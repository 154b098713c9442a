"""Experts: feed-forward networks that know nothing of routing."""

from keras_moe.experts import activations
from keras_moe.experts.activations import ClampedSwiGLU
from keras_moe.experts.activations import GatedActivation
from keras_moe.experts.base import Experts
from keras_moe.experts.feed_forward import FeedForward
from keras_moe.experts.initializers import StackedInitializer
from keras_moe.experts.initializers import reseeded
from keras_moe.experts.stacked_experts import StackedExperts
from keras_moe.experts.stacked_mlp import StackedMLP
