"""keras_moe for keras-hub models: sparse MoE models, upcycling, MoE blocks.

- `sparsify(model)`: keras-hub's MoE models (Mixtral, Qwen-MoE, Qwen3-MoE,
  Qwen3.5-MoE, GPT-OSS, Gemma 4) with keras_moe layers in their MoE blocks:
  same weights, same routing, only the chosen experts computed, shardable
  with `keras_moe.distribution.layout_map`.
- `upcycle(model, num_experts, top_k, every=1)`: dense keras-hub decoders
  (Llama, Mistral, Qwen, Gemma) turned into MoE models whose experts start
  as copies of the dense feed-forward networks.

Both convert a backbone (or a task's backbone) in place; the result saves and
loads with `keras.models.load_model` once this module has been imported.
Importing it imports keras-hub.
"""

import keras_hub as _keras_hub  # noqa: F401  (fail early without keras-hub)

from keras_moe.integrations.keras_hub.layers import KerasHubMoEBlock
from keras_moe.integrations.keras_hub.layers import RMSNormTopKRouter
from keras_moe.integrations.keras_hub.layers import RoutingInputs
from keras_moe.integrations.keras_hub.sparsify import sparsify
from keras_moe.integrations.keras_hub.surgery import converted_class
from keras_moe.integrations.keras_hub.upcycle import upcycle


def _register_known_backbones():
    """Registers `Sparse<Backbone>` for the backbones this module converts.

    So that a saved converted model loads in a new process once this module
    is imported.
    """
    names = (
        "MixtralBackbone",
        "QwenMoeBackbone",
        "Qwen3MoeBackbone",
        "Qwen3_5MoeBackbone",
        "GptOssBackbone",
        "Gemma4Backbone",
        "LlamaBackbone",
        "Llama3Backbone",
        "MistralBackbone",
        "QwenBackbone",
        "Qwen3Backbone",
        "GemmaBackbone",
    )
    for name in names:
        base = getattr(_keras_hub.models, name, None)
        if base is not None:
            converted_class(base)


_register_known_backbones()

__all__ = [
    "KerasHubMoEBlock",
    "RMSNormTopKRouter",
    "RoutingInputs",
    "converted_class",
    "sparsify",
    "upcycle",
]
