"""The layers that stand in for keras-hub's MoE blocks."""

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402
from keras import ops  # noqa: E402

from keras_moe.integrations.keras_hub import KerasHubMoEBlock  # noqa: E402
from keras_moe.integrations.keras_hub import RMSNormTopKRouter  # noqa: E402
from keras_moe.layers import SparseMoE  # noqa: E402


def _numpy(x):
    return ops.convert_to_numpy(x)


def test_rms_norm_router_equals_gemma4_router():
    from keras_hub.src.models.gemma4.gemma4_moe import Gemma4Router

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 8)).astype("float32")
    reference = Gemma4Router(num_experts=6, num_experts_per_token=2)
    reference.build(x.shape)
    router = RMSNormTopKRouter(num_experts=6, top_k=2, load_balance_loss_weight=0.0)
    router.build(x.shape)
    kernel = rng.standard_normal((8, 6)).astype("float32")
    scale = (1 + 0.3 * rng.standard_normal(8)).astype("float32")
    expert_scale = (1 + 0.3 * rng.standard_normal(6)).astype("float32")
    reference.proj.kernel.assign(kernel)
    reference.per_dim_scale.assign(scale)
    router.kernel.assign(kernel)
    router.input_scale.assign(scale)
    router.expert_scale.assign(expert_scale)
    dense = _numpy(reference(x))  # (T, E): renormalized top-k probabilities
    plan = router(x)
    indices = _numpy(plan.expert_indices).reshape(-1, 2)
    weights = _numpy(plan.expert_weights).reshape(-1, 2)
    expected = np.take_along_axis(dense, indices, axis=-1) * expert_scale[indices]
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-6)
    assert (np.take_along_axis(dense, indices, axis=-1) > 0).all()
    restored = RMSNormTopKRouter.from_config(router.get_config())
    assert restored.epsilon == router.epsilon and restored.top_k == 2


@pytest.mark.parametrize("returns", ["router_logits", "router_scores", "outputs"])
def test_block_returns_what_keras_hub_blocks_return(returns):
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype("float32")
    block = KerasHubMoEBlock(SparseMoE(num_experts=4, intermediate_dim=6, top_k=2), returns=returns)
    result = block(x)
    if returns == "outputs":
        assert tuple(result.shape) == (2, 3, 8)
        return
    outputs, second = result
    assert tuple(outputs.shape) == (2, 3, 8) and tuple(second.shape) == (6, 4)
    second = _numpy(second)
    if returns == "router_scores":
        # Dense combine weights: k non-zero entries per token summing to one.
        assert ((second > 0).sum(-1) == 2).all()
        np.testing.assert_allclose(second.sum(-1), 1.0, rtol=1e-5)
    # A (batch, seq, seq) attention mask marks tokens by rows with a visible key.
    mask = np.ones((2, 3, 3), bool)
    mask[1, 2] = False
    block(x, attention_mask=mask)
    assert float(_numpy(ops.sum(block.moe.expert_counts))) == 2 * 5
    restored = KerasHubMoEBlock.from_config(block.get_config())
    assert restored.returns == returns and isinstance(restored.moe, SparseMoE)


def test_block_rejects_other_layers():
    with pytest.raises(ValueError, match="must be a keras_moe.layers.MoE"):
        KerasHubMoEBlock(keras.layers.Dense(4))
    with pytest.raises(ValueError, match="returns"):
        KerasHubMoEBlock(SparseMoE(num_experts=2, intermediate_dim=4), returns="logits")
