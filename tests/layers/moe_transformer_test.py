"""MoETransformerEncoder / MoETransformerDecoder: keras-hub's blocks, routed."""

import os

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402
from keras import ops  # noqa: E402

import keras_moe  # noqa: E402
from keras_moe.layers import MoETransformerDecoder  # noqa: E402
from keras_moe.layers import MoETransformerEncoder  # noqa: E402
from keras_moe.layers import SparseMoE  # noqa: E402

HIDDEN = 16
ONE_EXPERT = {"num_experts": 1, "top_k": 1}


def _numpy(x):
    return ops.convert_to_numpy(x)


def _data(seed=0, batch=2, seq=6, hidden=HIDDEN):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, seq, hidden)).astype("float32")
    padding = np.ones((batch, seq), bool)
    padding[-1, seq - 2 :] = False
    return x, padding


def _copy_from_keras_hub(reference, block, names):
    for name in names:
        getattr(block, name).set_weights(getattr(reference, name).get_weights())
    up, up_bias = reference._feedforward_intermediate_dense.get_weights()
    down, down_bias = reference._feedforward_output_dense.get_weights()
    experts = block.moe.experts
    for variable, value in (
        (experts.up_kernel, up),
        (experts.up_bias, up_bias),
        (experts.down_kernel, down),
        (experts.down_bias, down_bias),
    ):
        variable.assign(value[None])


@pytest.mark.parametrize("normalize_first", [False, True])
def test_encoder_with_one_expert_equals_keras_hub(normalize_first):
    x, padding = _data()
    reference = keras_hub.layers.TransformerEncoder(
        intermediate_dim=24, num_heads=2, activation="gelu", normalize_first=normalize_first
    )
    reference(x)
    block = MoETransformerEncoder(
        intermediate_dim=24, num_heads=2, activation="gelu", normalize_first=normalize_first,
        moe=ONE_EXPERT,
    )
    block(x)
    _copy_from_keras_hub(
        reference,
        block,
        ("_self_attention_layer", "_self_attention_layer_norm", "_feedforward_layer_norm"),
    )
    attention_mask = np.tril(np.ones((2, 6, 6), bool))
    for kwargs in ({}, {"padding_mask": padding}, {"attention_mask": attention_mask}):
        expected = _numpy(reference(x, **kwargs))
        outputs = _numpy(block(x, **kwargs))
        # Padding tokens are not routed: only real tokens match.
        real = kwargs.get("padding_mask", np.ones(padding.shape, bool))
        np.testing.assert_allclose(outputs[real], expected[real], atol=1e-5, rtol=1e-5)
    outputs, scores = block(x, return_attention_scores=True)
    assert tuple(scores.shape) == (2, 2, 6, 6)


@pytest.mark.parametrize("normalize_first", [False, True])
def test_decoder_with_one_expert_equals_keras_hub(normalize_first):
    x, padding = _data()
    encoder_x, encoder_padding = _data(seed=1, seq=4)
    reference = keras_hub.layers.TransformerDecoder(
        intermediate_dim=24, num_heads=2, normalize_first=normalize_first
    )
    reference(x, encoder_x)
    block = MoETransformerDecoder(
        intermediate_dim=24, num_heads=2, normalize_first=normalize_first, moe=ONE_EXPERT
    )
    block(x, encoder_x)
    _copy_from_keras_hub(
        reference,
        block,
        (
            "_self_attention_layer",
            "_self_attention_layer_norm",
            "_cross_attention_layer",
            "_cross_attention_layer_norm",
            "_feedforward_layer_norm",
        ),
    )
    kwargs = {"decoder_padding_mask": padding, "encoder_padding_mask": encoder_padding}
    expected = _numpy(reference(x, encoder_x, **kwargs))
    outputs = _numpy(block(x, encoder_x, **kwargs))
    np.testing.assert_allclose(outputs[padding], expected[padding], atol=1e-5, rtol=1e-5)
    expected = _numpy(reference(x, encoder_x, use_causal_mask=False))
    outputs = _numpy(block(x, encoder_x, use_causal_mask=False))
    np.testing.assert_allclose(outputs, expected, atol=1e-5, rtol=1e-5)


def test_cached_decoding_equals_a_full_pass():
    x, _ = _data()
    encoder_x, _ = _data(seed=1, seq=4)
    block = MoETransformerDecoder(
        intermediate_dim=24, num_heads=2, moe={"num_experts": 4, "top_k": 2}
    )
    full = _numpy(block(x, encoder_x))
    batch, seq = x.shape[:2]
    self_cache = ops.zeros((batch, 2, seq, 2, HIDDEN // 2))
    cross_cache = ops.zeros((batch, 2, 4, 2, HIDDEN // 2))
    steps = []
    for i in range(seq):
        outputs, self_cache, cross_cache = block(
            x[:, i : i + 1],
            encoder_x,
            self_attention_cache=self_cache,
            self_attention_cache_update_index=i,
            cross_attention_cache=cross_cache,
            cross_attention_cache_update_index=0 if i == 0 else None,
        )
        steps.append(_numpy(outputs))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def _language_model(moe_arguments, vocabulary=30, seq=8):
    tokens = keras.Input((seq,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(
        vocabulary_size=vocabulary, sequence_length=seq, embedding_dim=HIDDEN, mask_zero=True
    )(tokens)
    x = MoETransformerDecoder(intermediate_dim=24, num_heads=2, moe=moe_arguments)(x)
    logits = keras.layers.Dense(vocabulary)(x)
    return keras.Model(tokens, logits)


def test_implicit_keras_mask_keeps_padding_unrouted():
    model = _language_model({"num_experts": 4, "top_k": 2})
    ids = np.array([[3, 4, 5, 6, 7, 8, 9, 2], [3, 4, 5, 0, 0, 0, 0, 0]], "int32")
    model(ids)
    moe = model.layers[2].moe
    # Only the 11 real tokens (token id 0 is padding) are routed, 2 choices each.
    assert float(_numpy(ops.sum(moe.expert_counts))) == 2 * 11


def test_routing_losses_reach_fit():
    model = _language_model({"num_experts": 4, "top_k": 2, "load_balance_loss_weight": 1.0})
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ids = np.random.default_rng(0).integers(1, 30, (4, 8)).astype("int32")
    labels = np.roll(ids, -1, axis=1)
    train_loss = float(model.train_on_batch(ids, labels))
    eval_loss = float(model.evaluate(ids, labels, verbose=0))
    # The load-balancing loss (>= ~1 near balance, weight 1) is added in
    # training only; SGD(0) leaves the weights unchanged.
    assert train_loss - eval_loss > 0.5


def test_with_a_keras_hub_tokenizer_and_serialization(tmp_path):
    tokenizer = keras_hub.tokenizers.ByteTokenizer(sequence_length=8)
    ids = _numpy(tokenizer(["mixture", "of experts"])).astype("int32")
    router = keras_moe.routers.TopKRouter(num_experts=3, top_k=1)
    experts = keras_moe.experts.StackedExperts(num_experts=3, intermediate_dim=12)
    tokens = keras.Input((8,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(
        vocabulary_size=256, sequence_length=8, embedding_dim=HIDDEN
    )(tokens)
    x = MoETransformerEncoder(
        intermediate_dim=24, num_heads=2, dropout=0.1,
        moe=keras_moe.layers.MoE(router=router, experts=experts),
    )(x)
    x = MoETransformerDecoder(intermediate_dim=24, num_heads=2, moe={"num_experts": 2})(x)
    model = keras.Model(tokens, x)
    outputs = _numpy(model(ids))
    assert outputs.shape == (2, 8, HIDDEN)
    assert not np.allclose(_numpy(model(ids, training=True)), outputs)  # dropout
    model.summary(print_fn=lambda *args, **kwargs: None)
    path = os.path.join(tmp_path, "blocks.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(_numpy(loaded(ids)), outputs, atol=1e-6, rtol=0)
    config = model.layers[3].get_config()
    assert config["moe"]["class_name"] == "SparseMoE"
    assert config["moe"]["config"]["num_experts"] == 2
    assert config["moe"]["config"]["use_bias"] is True


def test_invalid_arguments():
    with pytest.raises(ValueError, match="`moe` must be a keras_moe routed layer"):
        MoETransformerEncoder(intermediate_dim=8, num_heads=2)
    with pytest.raises(ValueError, match="needs `num_experts`"):
        MoETransformerEncoder(intermediate_dim=8, num_heads=2, moe={"top_k": 1})
    with pytest.raises(ValueError, match="num_heads"):
        MoETransformerDecoder(intermediate_dim=8, num_heads=0, moe=ONE_EXPERT)
    shared = SparseMoE(num_experts=2, intermediate_dim=8)
    MoETransformerEncoder(intermediate_dim=8, num_heads=2, moe=shared, name="first")
    with pytest.raises(ValueError, match="already is the feed-forward of block 'first'"):
        MoETransformerDecoder(intermediate_dim=8, num_heads=2, moe=shared)
    block = MoETransformerDecoder(intermediate_dim=8, num_heads=2, moe=ONE_EXPERT)
    x, _ = _data()
    block(x)
    with pytest.raises(ValueError, match="without cross-attention"):
        block(x, x)
