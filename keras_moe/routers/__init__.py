"""Routers decide which experts see which tokens; they move no data.

A router turns tokens into a `RoutingPlan`; `keras_moe.layers.MoE` moves the
tokens by that plan. New routing algorithms subclass `Router`.
"""

from keras_moe.routers.base import LazyLosses
from keras_moe.routers.base import Router
from keras_moe.routers.base import RoutingPlan
from keras_moe.routers.expert_choice_router import ExpertChoiceRouter
from keras_moe.routers.noisy_top_k_router import NoisyTopKRouter
from keras_moe.routers.top_k_router import TopKRouter
