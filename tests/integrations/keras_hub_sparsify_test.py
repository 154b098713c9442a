"""`sparsify` on keras-hub's MoE models: same function, sparse compute.

Each family's tiny backbone gets unit-scale random MoE weights (so routing
decides the outputs), then is compared before and after `sparsify`: hidden
states of the real tokens, the routing loss keras-hub adds in training,
greedy generation through the family's CausalLM, and a `.keras` round trip.
"""

import os

import numpy as np
import pytest

from tests.integrations import hub_models

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402
from keras import ops  # noqa: E402

from keras_moe.integrations.keras_hub import KerasHubMoEBlock  # noqa: E402
from keras_moe.integrations.keras_hub import sparsify  # noqa: E402
from keras_moe.layers import MoE  # noqa: E402

ATOL = 1e-4


def _numpy(x):
    return ops.convert_to_numpy(x)


def _training_loss(backbone, x):
    backbone(x, training=True)
    return float(sum(float(_numpy(loss)) for loss in backbone.losses))


def _keras_hub_moe_parts(backbone):
    from keras_hub.src.models.gemma4.gemma4_moe import Gemma4MoEBlock
    from keras_hub.src.models.gemma4.gemma4_moe import Gemma4Router

    parts = []
    for decoder in backbone.transformer_layers:
        for layer in decoder._flatten_layers(include_self=False):
            name = type(layer).__name__
            if isinstance(layer, (Gemma4MoEBlock, Gemma4Router)) or name.endswith("SparseMoeBlock"):
                parts.append(layer)
    return parts


@pytest.mark.parametrize("family", sorted(hub_models.MOE_FAMILIES))
def test_sparsify_matches_keras_hub(family, tmp_path):
    make, causal_lm, has_loss = hub_models.MOE_FAMILIES[family]
    backbone = make()
    hub_models.redraw_moe_weights(backbone)
    x = hub_models.inputs(family)
    real = x["padding_mask"].astype(bool)
    expected = _numpy(backbone(x))
    expected_loss = _training_loss(backbone, x) if has_loss else 0.0
    lm = getattr(keras_hub.models, causal_lm)(backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    prompts = hub_models.prompts(family)
    expected_tokens = _numpy(lm.generate(prompts, stop_token_ids=None)["token_ids"])

    assert sparsify(lm) is lm
    assert lm.backbone is backbone
    assert type(backbone).__name__ == f"Sparse{type(backbone).__mro__[1].__name__}"
    assert _keras_hub_moe_parts(backbone) == []
    blocks = [
        layer
        for layer in backbone._flatten_layers()
        if isinstance(layer, KerasHubMoEBlock)
    ]
    assert len(blocks) == len(backbone.transformer_layers)
    assert all(isinstance(block.moe, MoE) for block in blocks)

    outputs = _numpy(backbone(x))
    np.testing.assert_allclose(outputs[real], expected[real], atol=ATOL, rtol=0)
    if has_loss:
        assert expected_loss > 0
        np.testing.assert_allclose(_training_loss(backbone, x), expected_loss, rtol=1e-5)
    else:
        assert _training_loss(backbone, x) == 0.0
    tokens = _numpy(lm.generate(prompts, stop_token_ids=None)["token_ids"])
    np.testing.assert_array_equal(tokens, expected_tokens)

    path = os.path.join(tmp_path, "sparse.keras")
    lm.save(path)
    loaded = keras.models.load_model(path, compile=False)
    assert type(loaded.backbone) is type(backbone)
    np.testing.assert_allclose(_numpy(loaded.backbone(x)), outputs, atol=1e-6, rtol=0)


def test_sparsify_routes_only_real_tokens_and_trains():
    backbone = hub_models.MOE_FAMILIES["mixtral"][0](num_layers=2)
    x = hub_models.inputs("mixtral")
    lm = keras_hub.models.MixtralCausalLM(backbone=backbone, preprocessor=None)
    sparsify(lm)
    backbone(x)
    for decoder in backbone.transformer_layers:
        moe = decoder._sparse_moe_block.moe
        # Padding is neither routed nor counted: k assignments per real token.
        assert float(_numpy(ops.sum(moe.expert_counts))) == 2 * x["padding_mask"].sum()

    lm.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    moe = backbone.transformer_layers[0]._sparse_moe_block.moe
    before = _numpy(moe.experts.up_kernel).copy()
    labels = np.roll(x["token_ids"], -1, axis=1)
    history = lm.fit(x, labels, sample_weight=x["padding_mask"], epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(_numpy(moe.experts.up_kernel), before)
    if keras.backend.backend() == "torch":
        # The torch parameter registry holds the new variables, not the old.
        registered = {id(p) for p in lm.parameters()}
        assert id(moe.experts.up_kernel.value) in registered


def test_sparsify_options():
    backbone = hub_models.MOE_FAMILIES["mixtral"][0]()
    sparsify(backbone, capacity_factor=1.0, eval_capacity_factor=2.0, router_z_loss_weight=1e-3)
    moe = backbone.transformer_layers[0]._sparse_moe_block.moe
    assert moe.capacity_factor == 1.0 and moe.eval_capacity_factor == 2.0
    assert moe.router.initial_loss_weights["z"] == 1e-3
    assert backbone.get_config()["keras_moe_conversions"] == [
        {
            "kind": "sparsify",
            "arguments": {
                "capacity_factor": 1.0,
                "eval_capacity_factor": 2.0,
                "router_z_loss_weight": 1e-3,
            },
        }
    ]
    restored = type(backbone).from_config(backbone.get_config())
    assert restored.transformer_layers[0]._sparse_moe_block.moe.capacity_factor == 1.0


def test_sparsify_rejects_what_it_cannot_convert():
    backbone = hub_models.MOE_FAMILIES["mixtral"][0]()
    with pytest.raises(ValueError, match="unknown arguments: \\['top_k'\\]"):
        sparsify(backbone, top_k=1)
    with pytest.raises(ValueError, match="Backbone or a keras_hub.models.Task"):
        sparsify(keras.Sequential([keras.layers.Dense(2)]))
    sparsify(backbone)
    with pytest.raises(ValueError, match="found no keras-hub MoE block"):
        sparsify(backbone)
    dense = keras_hub.models.LlamaBackbone(
        vocabulary_size=20, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=8, intermediate_dim=16,
    )
    with pytest.raises(ValueError, match="see `upcycle`"):
        sparsify(dense)


def test_sparsify_keeps_the_dtype_policy():
    backbone = keras_hub.models.MixtralBackbone(
        vocabulary_size=hub_models.VOCAB, num_layers=1, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=8, intermediate_dim=8, num_experts=4, top_k=2,
        dtype="mixed_bfloat16",
    )
    sparsify(backbone)
    moe = backbone.transformer_layers[0]._sparse_moe_block.moe
    assert moe.compute_dtype == "bfloat16"
    assert moe.experts.up_kernel.dtype == "float32"  # mixed precision: float32 variables
    assert moe.router.compute_dtype == "float32"  # the router stays float32
    outputs = backbone(hub_models.inputs("mixtral"))
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    assert np.isfinite(_numpy(ops.cast(outputs, "float32"))).all()
