"""The `Examples:` in the public docstrings run, on every backend."""

import doctest
import importlib

import pytest

MODULES = [
    "keras_moe.layers.moe",
    "keras_moe.layers.sparse_moe",
    "keras_moe.layers.switch_ffn",
    "keras_moe.layers.mmoe",
    "keras_moe.layers.cgc",
    "keras_moe.layers.ple",
    "keras_moe.layers.expert_choice_moe",
    "keras_moe.layers.soft_moe",
    "keras_moe.models.multi_task",
    "keras_moe.models.shared_bottom",
    "keras_moe.routers.top_k_router",
    "keras_moe.dispatch.blocks",
    "keras_moe.dispatch.dropless",
    "keras_moe.backend.constants",
    "keras_moe.routers.noisy_top_k_router",
    "keras_moe.routers.expert_choice_router",
    "keras_moe.experts.base",
    "keras_moe.experts.stacked_experts",
    "keras_moe.experts.feed_forward",
    "keras_moe.experts.stacked_mlp",
    "keras_moe.experts.initializers",
    "keras_moe.experts.activations",
    "keras_moe.layers.moe_transformer",
    "keras_moe.integrations.keras_hub.layers",
    "keras_moe.integrations.keras_hub.sparsify",
    "keras_moe.integrations.keras_hub.upcycle",
    "keras_moe.losses.router_losses",
    "keras_moe.statistics",
    "keras_moe.callbacks.router_monitor",
    "keras_moe.callbacks.aux_loss_scheduler",
    "keras_moe.callbacks.expert_bias_balancer",
    "keras_moe.distribution.layouts",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
