"""The fused per-expert FFN of TensorFlow graphs (`keras_moe.backend.expert_ffn`) agrees with
the two portable dropless functions (`gather_matmul` + `matmul_combine`)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import backend as fast
from keras_moe.dispatch import blocks
from keras_moe.dispatch import grouped
from keras_moe.experts.feed_forward import activate


def _setup(gated, use_bias, masked, seed=0):
    tokens, k, E, d, h = 19, 2, 5, 6, 7
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.choice(E - 1, k, replace=False) for _ in range(tokens)]).astype("int32")
    indices[:6, 0] = 0  # a crowded expert; expert E - 1 gets nothing
    indices[:6, 1] = np.where(indices[:6, 1] == 0, 1, indices[:6, 1])
    valid = np.ones((tokens, k), bool)
    valid[::4] = False  # masked assignments: rows after the experts'
    names = ["up", "gate"] if gated else ["up"]
    params = {
        "x": rng.standard_normal((tokens, d)),
        "expert_weights": rng.random((tokens, k)),
        "down": rng.standard_normal((E, h, d)) / 3,
    }
    for n in names:
        params[n] = rng.standard_normal((E, d, h)) / 3
        if use_bias:
            params[n + "_bias"] = rng.standard_normal((E, h))
    if use_bias:
        params["down_bias"] = rng.standard_normal((E, d))
    params = {n: v.astype("float32") for n, v in params.items()}
    # Enough rows for the plan's (padded) row count; `_ffn` takes the first ones.
    mask = (rng.random((4 * tokens * k, h)) > 0.3).astype("float32") / 0.7 if masked else None
    return names, indices, valid, params, mask


def _ffn(use_fast, names, indices, valid, mask, values):
    plan = blocks.plan_rows(indices, valid, 5, 1)
    weights = blocks.row_weights(values["expert_weights"], plan)
    if mask is not None:
        mask = mask[: ops.shape(plan.row_experts)[0]]
    kernels = [values[n] for n in names]
    biases = [values.get(n + "_bias") for n in names]

    def act(*first):
        return activate(first, keras.activations.silu)

    if use_fast:
        return fast.expert_ffn(
            values["x"], kernels, biases, values["down"], values.get("down_bias"), weights, plan,
            "ranges", act, mask=mask,
        )
    first = grouped.gather_matmul(values["x"], kernels, plan, "ranges")
    first = [f if b is None else f + ops.take(b, plan.row_experts, axis=0) for f, b in zip(first, biases)]
    return grouped.matmul_combine(
        first, weights, values["down"], values.get("down_bias"), plan, "ranges", activation=act, mask=mask
    )


@pytest.mark.parametrize("gated, use_bias, masked", [(True, False, False), (False, True, True), (True, True, True)])
def test_expert_ffn_matches_the_portable_functions_in_a_tf_graph(gated, use_bias, masked):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("a TensorFlow-graph fast path")
    import tensorflow as tf

    names, indices, valid, params, mask = _setup(gated, use_bias, masked)
    upstream = np.random.default_rng(1).standard_normal(params["x"].shape).astype("float32")

    def value_and_grads(use_fast):
        # The routing is an argument, as in a model (computed in the graph). As
        # graph constants, TF 2.21's graph optimizer crashed the process (SIGFPE)
        # folding an empty expert's pieces.
        @tf.function
        def run(indices, valid, mask, *values):
            values = dict(zip(params, values))
            with tf.GradientTape() as tape:
                tape.watch(list(values.values()))
                out = _ffn(use_fast, names, indices, valid, mask if masked else None, values)
                loss = tf.reduce_sum(out * upstream)
            grads = tape.gradient(loss, list(values.values()))
            return out, [tf.convert_to_tensor(g) for g in grads]  # a take's gradient is sparse

        routing = [tf.constant(indices), tf.constant(valid), tf.constant(mask if masked else 0.0)]
        return run(*routing, *[tf.constant(v) for v in params.values()])

    out, grads = value_and_grads(True)
    ref, ref_grads = value_and_grads(False)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-5)
    for name, g, r in zip(params, grads, ref_grads):
        np.testing.assert_allclose(g.numpy(), r.numpy(), atol=1e-5, err_msg=name)


def test_expert_ffn_declines_outside_tf_graphs():
    names, indices, valid, params, mask = _setup(True, False, False)
    # Eager (every backend), and other strategies: the caller runs the portable functions.
    assert _ffn(True, names, indices, valid, mask, params) is None
    plan = blocks.plan_rows(indices, valid, 5, 1)
    weights = blocks.row_weights(params["expert_weights"], plan)
    assert (
        fast.expert_ffn(params["x"], [params["up"]], [None], params["down"], None, weights, plan, "scan", ops.relu)
        is None
    )
