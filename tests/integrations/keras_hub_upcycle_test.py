"""`upcycle`: dense keras-hub decoders become MoE decoders equal at init."""

import os

import numpy as np
import pytest

from tests.integrations import hub_models

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402
from keras import ops  # noqa: E402

from keras_moe.integrations.keras_hub import upcycle  # noqa: E402
from keras_moe.layers import SparseMoE  # noqa: E402

_COMMON = dict(vocabulary_size=hub_models.VOCAB, num_query_heads=2, num_key_value_heads=1)

# family: (backbone factory, CausalLM class name, dense projection attribute)
DENSE_FAMILIES = {
    "llama": (
        lambda n: keras_hub.models.LlamaBackbone(
            **_COMMON, num_layers=n, hidden_dim=16, intermediate_dim=24
        ),
        "LlamaCausalLM",
        "_feedforward_gate_dense",
    ),
    "mistral": (
        lambda n: keras_hub.models.MistralBackbone(
            **_COMMON, num_layers=n, hidden_dim=16, intermediate_dim=24, sliding_window=8
        ),
        "MistralCausalLM",
        "_feedforward_gate_dense",
    ),
    "gemma": (
        lambda n: keras_hub.models.GemmaBackbone(
            **_COMMON, num_layers=n, hidden_dim=16, intermediate_dim=48, head_dim=8
        ),
        "GemmaCausalLM",
        "gating_ffw",
    ),
}


def _numpy(x):
    return ops.convert_to_numpy(x)


def _randomize(backbone, seed=0):
    """Unit-scale weights, so the feed-forward matters in the outputs."""
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        shape = tuple(variable.shape)
        if len(shape) == 2:
            variable.assign((rng.standard_normal(shape) / np.sqrt(shape[0])).astype("float32"))


@pytest.mark.parametrize("family", sorted(DENSE_FAMILIES))
def test_upcycled_model_starts_as_the_dense_model(family, tmp_path):
    make, causal_lm, projection = DENSE_FAMILIES[family]
    backbone = make(2)
    _randomize(backbone)
    x = hub_models.inputs(family)
    real = x["padding_mask"].astype(bool)
    dense = _numpy(backbone(x))
    lm = getattr(keras_hub.models, causal_lm)(backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    prompts = hub_models.prompts(family)
    dense_tokens = _numpy(lm.generate(prompts, stop_token_ids=None)["token_ids"])

    upcycle(lm, num_experts=4, top_k=2, router_initializer="zeros")
    for decoder in backbone.transformer_layers:
        assert type(decoder).__name__.startswith("MoE")
        assert not hasattr(decoder, projection)
        moe = decoder._feedforward_moe
        assert isinstance(moe, SparseMoE) and moe.num_experts == 4 and moe.top_k == 2
        np.testing.assert_array_equal(_numpy(moe.router.kernel), 0.0)
    kernels = _numpy(backbone.transformer_layers[0]._feedforward_moe.experts.gate_kernel)
    np.testing.assert_array_equal(kernels, np.broadcast_to(kernels[:1], kernels.shape))

    np.testing.assert_allclose(_numpy(backbone(x))[real], dense[real], atol=1e-5, rtol=0)
    tokens = _numpy(lm.generate(prompts, stop_token_ids=None)["token_ids"])
    np.testing.assert_array_equal(tokens, dense_tokens)

    path = os.path.join(tmp_path, "upcycled.keras")
    backbone.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(backbone)
    np.testing.assert_allclose(_numpy(loaded(x)), _numpy(backbone(x)), atol=1e-6, rtol=0)


def test_any_router_starts_equal_and_every_chooses_layers():
    make = DENSE_FAMILIES["llama"][0]
    backbone = make(4)
    _randomize(backbone)
    x = hub_models.inputs("llama")
    real = x["padding_mask"].astype(bool)
    dense = _numpy(backbone(x))
    # A random router: renormalized weights of identical experts sum to the
    # dense output.
    upcycle(backbone, num_experts=3, top_k=2, every=2, load_balance_loss_weight=0.1)
    upcycled = [hasattr(d, "_feedforward_moe") for d in backbone.transformer_layers]
    assert upcycled == [False, True, False, True]
    assert float(np.abs(_numpy(backbone.transformer_layers[1]._feedforward_moe.router.kernel)).max()) > 0
    np.testing.assert_allclose(_numpy(backbone(x))[real], dense[real], atol=1e-5, rtol=0)
    arguments = backbone.get_config()["keras_moe_conversions"][0]["arguments"]
    assert arguments == {
        "num_experts": 3, "top_k": 2, "every": 2, "load_balance_loss_weight": 0.1
    }


def test_upcycled_experts_drift_apart_in_training():
    backbone = DENSE_FAMILIES["llama"][0](1)
    lm = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    upcycle(lm, num_experts=4, top_k=2)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = hub_models.inputs("llama", batch=4)
    lm.fit(x, np.roll(x["token_ids"], -1, axis=1), sample_weight=x["padding_mask"], verbose=0)
    kernels = _numpy(backbone.transformer_layers[0]._feedforward_moe.experts.up_kernel)
    assert not np.allclose(kernels[0], kernels[1])


def test_upcycle_rejects_bad_arguments():
    backbone = DENSE_FAMILIES["llama"][0](1)
    with pytest.raises(ValueError, match="top_k"):
        upcycle(backbone, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_experts"):
        upcycle(backbone, num_experts=0, top_k=1)
    with pytest.raises(ValueError, match="every"):
        upcycle(backbone, num_experts=2, top_k=1, every=0)
    with pytest.raises(ValueError, match="unknown arguments: \\['activation'\\]"):
        upcycle(backbone, num_experts=2, top_k=1, activation="relu")
    with pytest.raises(ValueError, match="converts the dense decoders"):
        upcycle(hub_models.MOE_FAMILIES["mixtral"][0](), num_experts=2, top_k=1)
    upcycle(backbone, num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="already upcycled"):
        upcycle(backbone, num_experts=2, top_k=1)


@pytest.mark.parametrize("name", ["QwenBackbone", "Qwen3Backbone"])
def test_upcycled_qwen_decoders_start_as_dense(name):
    # Qwen and Qwen3 decoders share the Llama decoders' `call` line for line.
    extra = {"head_dim": 8} if name == "Qwen3Backbone" else {}
    backbone = getattr(keras_hub.models, name)(
        **_COMMON, num_layers=1, hidden_dim=16, intermediate_dim=24, **extra
    )
    _randomize(backbone)
    x = hub_models.inputs("qwen")
    real = x["padding_mask"].astype(bool)
    dense = _numpy(backbone(x))
    upcycle(backbone, num_experts=4, top_k=2)
    assert type(backbone.transformer_layers[0]).__name__.startswith("MoEQwen")
    np.testing.assert_allclose(_numpy(backbone(x))[real], dense[real], atol=1e-5, rtol=0)
