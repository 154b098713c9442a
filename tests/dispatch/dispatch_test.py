"""Dispatch layouts agree with each other and with the capacity rules."""

import keras
import numpy as np
import pytest

from keras_moe import backend as fast
from keras_moe import dispatch
from keras_moe.experts import StackedExperts


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _routing(tokens, k, num_experts, seed=0):
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(tokens)])
    weights = rng.random((tokens, k)).astype("float32")
    return indices.astype("int32"), weights


def _dense_reference(experts, x, indices, weights, valid):
    """Every expert on every token, then pick: the thing dispatch avoids."""
    all_out = _np(experts(np.broadcast_to(x, (experts.num_experts,) + x.shape)))  # (E, T, d)
    out = np.zeros_like(x)
    for t in range(len(x)):
        for j in range(indices.shape[1]):
            if valid[t, j]:
                out[t] += weights[t, j] * all_out[indices[t, j], t]
    return out


STRATEGIES = ["ranges", "scan", "grouped", "batched"]


def _skip_unavailable(strategy):
    if strategy == "grouped" and not fast.has_grouped_matmul():
        pytest.skip("no grouped-matmul fast path on this backend/device")
    if strategy == "ranges" and keras.backend.backend() == "jax":
        pytest.skip("'ranges' needs dynamic shapes")


def _grads(fn, args, tf_graph=False):
    """`(value, [d fn / d arg])` by the backend's autodiff (in a `tf.function` with `tf_graph`)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        value, grads = jax.value_and_grad(fn, argnums=tuple(range(len(args))))(*args)
        return value, list(grads)
    if backend == "tensorflow":
        import tensorflow as tf

        def value_and_grads(*args):
            with tf.GradientTape() as tape:
                for a in args:
                    tape.watch(a)
                value = fn(*args)
            return value, tape.gradient(value, list(args))

        if tf_graph:
            value_and_grads = tf.function(value_and_grads)
        return value_and_grads(*[tf.constant(a) for a in args])
    import torch

    args = [torch.tensor(np.asarray(a), requires_grad=True) for a in args]
    value = fn(*args)
    value.backward()
    return value.detach(), [a.grad for a in args]


def _reference_moe(x, indices, weights, valid, kernels, biases, gated, activation):
    """Every expert on every token with `keras.ops`, then the routed sum (autodiff reference)."""
    ops = keras.ops
    up, gate, down = kernels
    up_b, gate_b, down_b = biases
    num_experts = up.shape[0]

    def project(t, kernel, bias):
        y = ops.einsum("td,edh->eth", t, kernel)
        return y if bias is None else y + ops.expand_dims(bias, 1)

    first = project(x, up, up_b)
    hidden = activation(project(x, gate, gate_b)) * first if gated else activation(first)
    y = ops.einsum("eth,ehd->etd", hidden, down)  # (E, T, d)
    if down_b is not None:
        y = y + ops.expand_dims(down_b, 1)
    choose = ops.one_hot(indices, num_experts) * ops.expand_dims(ops.cast(valid, "float32"), -1)
    choose = choose * ops.expand_dims(weights, -1)  # (T, k, E)
    return ops.einsum("tke,etd->td", choose, y)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("gated, use_bias", [(False, False), (True, True)])
def test_dropless_matches_dense_reference(gated, use_bias, strategy):
    _skip_unavailable(strategy)
    tokens, k, E, d = 37, 2, 5, 6
    x = np.random.default_rng(1).standard_normal((tokens, d)).astype("float32")
    indices, weights = _routing(tokens, k, E)
    valid = np.ones((tokens, k), bool)
    valid[-4:] = False
    experts = StackedExperts(E, 7, gated=gated, use_bias=use_bias, bias_initializer="random_normal")
    experts.build((None, d))
    out = _np(dispatch.dispatch_dropless(x, indices, weights, valid, experts, strategy=strategy))
    np.testing.assert_allclose(out, _dense_reference(experts, x, indices, weights, valid), atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "gated, use_bias, block_size", [(True, False, None), (False, True, 4), (True, True, 2)]
)
def test_dropless_gradients_match_autodiff_reference(gated, use_bias, block_size, strategy):
    """The hand-written backward passes against autodiff of a dense computation.

    Gradients of the tokens, the combine weights and every expert weight;
    an expert nobody chose, a crowded one and masked assignments included.
    """
    _check_gradients(gated, use_bias, block_size, strategy)


@pytest.mark.parametrize("gated, use_bias", [(True, False), (False, True)])
def test_ranges_in_a_tf_graph_match_autodiff_reference(gated, use_bias):
    """The `"ranges"` loop in a TF graph: dynamic sizes, per-expert row pieces, experts in flight."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("TensorFlow graphs only")
    _check_gradients(gated, use_bias, None, "ranges", tf_graph=True)


def _check_gradients(gated, use_bias, block_size, strategy, tf_graph=False):
    _skip_unavailable(strategy)
    if strategy == "grouped" and block_size is not None:
        block_size = 8
    tokens, k, E, d, h = 23, 2, 5, 6, 7
    rng = np.random.default_rng(5)
    x = rng.standard_normal((tokens, d)).astype("float32")
    indices, weights = _routing(tokens, k, E - 1, seed=6)  # expert E-1 gets nothing
    indices[:8, 0] = 0  # a crowded expert
    indices[:8, 1] = np.where(indices[:8, 1] == 0, 1, indices[:8, 1])
    valid = np.ones((tokens, k), bool)
    valid[::5] = False
    experts = StackedExperts(
        E, h, gated=gated, use_bias=use_bias, activation="silu", bias_initializer="random_normal"
    )
    experts.build((None, d))
    names = ["up_kernel", "gate_kernel", "down_kernel", "up_bias", "gate_bias", "down_bias"]
    params = {n: _np(getattr(experts, n)) for n in names if getattr(experts, n) is not None}
    upstream = rng.standard_normal((tokens, d)).astype("float32")

    def loss_dispatch(x, weights, *values):
        variables = [v for v in experts.weights if v.path.split("/")[-1] in params]
        by_name = dict(zip(params, values))
        mapping = [(v, by_name[v.path.split("/")[-1]]) for v in variables]
        with keras.StatelessScope(state_mapping=mapping):
            out = dispatch.dispatch_dropless(
                x, indices, weights, valid, experts, strategy=strategy, block_size=block_size
            )
        return keras.ops.sum(keras.ops.multiply(out, upstream))

    def loss_reference(x, weights, *values):
        v = dict(zip(params, values))
        kernels = (v["up_kernel"], v.get("gate_kernel"), v["down_kernel"])
        biases = (v.get("up_bias"), v.get("gate_bias"), v.get("down_bias"))
        out = _reference_moe(x, indices, weights, valid, kernels, biases, gated, keras.activations.silu)
        return keras.ops.sum(keras.ops.multiply(out, upstream))

    value, grads = _grads(loss_dispatch, [x, weights, *params.values()], tf_graph)
    ref_value, ref_grads = _grads(loss_reference, [x, weights, *params.values()])
    np.testing.assert_allclose(_np(value), _np(ref_value), rtol=1e-5)
    for name, g, r in zip(["x", "weights", *params], grads, ref_grads):
        np.testing.assert_allclose(_np(g), _np(r), atol=2e-5, err_msg=name)
    # Masked assignments: no gradient reaches their weights.
    assert np.all(_np(grads[1])[~valid] == 0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dropless_invalid_assignments_contribute_exact_zeros(strategy):
    """Masked tokens may hold NaN/inf (non-finite router logits): nothing leaks."""
    _skip_unavailable(strategy)
    tokens, k, E, d = 12, 2, 3, 4
    x = np.random.default_rng(7).standard_normal((tokens, d)).astype("float32")
    indices, weights = _routing(tokens, k, E, seed=8)
    valid = np.ones((tokens, k), bool)
    valid[3] = False
    valid[tokens - 1] = False  # the last token: padding rows read it in its place
    x[3] = np.nan
    x[tokens - 1] = np.inf
    weights[3] = np.nan
    weights[tokens - 1] = np.inf
    experts = StackedExperts(E, 5, gated=True, activation="silu")
    experts.build((None, d))
    routed = np.any(valid, -1)[:, None]

    def loss(x, weights):
        out = dispatch.dispatch_dropless(x, indices, weights, valid, experts, strategy=strategy)
        return keras.ops.sum(keras.ops.where(routed, out, 0.0))

    value, (d_x, d_weights) = _grads(loss, [x, weights])
    assert np.isfinite(_np(value))
    out = _np(dispatch.dispatch_dropless(x, indices, weights, valid, experts, strategy=strategy))
    assert np.all(out[~routed[:, 0]] == 0) and np.all(np.isfinite(out))
    assert np.all(np.isfinite(_np(d_x))) and np.all(_np(d_x)[~routed[:, 0]] == 0)
    assert np.all(np.isfinite(_np(d_weights))) and np.all(_np(d_weights)[~valid] == 0)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_plan_rows_layout(block_size, portable):
    """Rows sorted by expert, each expert's rows starting on a block boundary."""
    tokens, k, E = 50, 2, 6
    indices, _ = _routing(tokens, k, E, seed=3)
    indices[:20, 0] = 0  # a crowded expert
    indices[:20, 1] = np.where(indices[:20, 1] == 0, 1, indices[:20, 1])
    valid = np.ones((tokens, k), bool)
    valid[::7] = False
    plan = dispatch.plan_rows(indices, valid, E, block_size, portable=portable)
    row_tokens = _np(plan.row_tokens)
    row_assignments = _np(plan.row_assignments)
    row_experts = _np(plan.row_experts)
    assignment_rows = _np(plan.assignment_rows)
    sizes = _np(plan.group_sizes)
    rows = len(row_tokens)
    assert rows == (-(-tokens * k // block_size) + E - 1) * block_size
    assert np.all(sizes % block_size == 0) and sizes.sum() <= rows
    np.testing.assert_array_equal(row_experts, np.repeat(_np(plan.block_experts), block_size))
    starts = np.cumsum(sizes) - sizes
    for t in range(tokens):
        for j in range(k):
            r = assignment_rows[t, j]
            if not valid[t, j]:
                assert r == rows
                continue
            e = indices[t, j]
            assert starts[e] <= r < starts[e] + sizes[e] and row_experts[r] == e
            assert row_tokens[r] == t and row_assignments[r] == t * k + j
    filled = row_tokens < tokens
    assert filled.sum() == valid.sum()
    assert np.all(row_assignments[~filled] == tokens * k)
    # Within an expert, rows keep the token order (a stable sort).
    for e in range(E):
        mine = row_tokens[(row_experts == e) & filled]
        assert np.all(np.diff(mine) > 0)


@pytest.mark.parametrize("portable", [False, True])
def test_gather_and_combine_rows_are_transposes(portable):
    """`<gather(x), y> == <x, combine(y)>`, and each one's gradient is the other."""
    tokens, k, E, d = 9, 2, 3, 4
    indices, _ = _routing(tokens, k, E, seed=9)
    valid = np.ones((tokens, k), bool)
    valid[2] = False
    plan = dispatch.plan_rows(indices, valid, E, 2)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((tokens, d)).astype("float32")
    y = rng.standard_normal((len(_np(plan.row_tokens)), d)).astype("float32")
    rows = _np(dispatch.gather_rows(x, plan, portable=portable))
    tokens_back = _np(dispatch.combine_rows(y, plan, portable=portable))
    np.testing.assert_allclose(np.sum(rows * y), np.sum(x * tokens_back), rtol=1e-5)
    _, (d_x,) = _grads(lambda x: keras.ops.sum(keras.ops.multiply(dispatch.gather_rows(x, plan, portable), y)), [x])
    np.testing.assert_allclose(_np(d_x), tokens_back, atol=1e-6)
    _, (d_y,) = _grads(lambda y: keras.ops.sum(keras.ops.multiply(dispatch.combine_rows(y, plan, portable), x)), [y])
    np.testing.assert_allclose(_np(d_y), _np(dispatch.gather_rows(x, plan)), atol=1e-6)


@pytest.mark.parametrize("h", [5, 3])  # the combine weights scale the (R, d) side when d < h
@pytest.mark.parametrize("strategy", ["grouped", "batched"])
def test_fused_matmuls_custom_gradients_match_autodiff(strategy, h):
    """`gather_matmul` / `matmul_combine`: hand-written backward == autodiff of the forward."""
    _skip_unavailable(strategy)
    tokens, k, E, d = 11, 2, 3, 4
    indices, _ = _routing(tokens, k, E, seed=11)
    valid = np.ones((tokens, k), bool)
    valid[4] = False
    plan = dispatch.plan_rows(indices, valid, E, 8)
    rows = len(_np(plan.row_tokens))
    rng = np.random.default_rng(12)
    x = rng.standard_normal((tokens, d)).astype("float32")
    up, gate = rng.standard_normal((2, E, d, h)).astype("float32")
    down = rng.standard_normal((E, h, d)).astype("float32")
    bias = rng.standard_normal((E, d)).astype("float32")
    weights = _np(dispatch.row_weights(rng.random((tokens, k)).astype("float32"), plan))
    mask = (rng.random((rows, h)) > 0.3).astype("float32")
    upstream = rng.standard_normal((tokens, d)).astype("float32")

    def loss(portable):
        def fn(x, up, gate, down, bias, weights):
            first = dispatch.gather_matmul(x, [up, gate], plan, strategy, portable=portable)
            out = dispatch.matmul_combine(
                first,
                weights,
                down,
                bias,
                plan,
                strategy,
                activation=lambda u, g: keras.activations.silu(g) * u,
                mask=mask,
                portable=portable,
            )
            return keras.ops.sum(keras.ops.multiply(out, upstream))

        return fn

    args = [x, up, gate, down, bias, weights]
    value, grads = _grads(loss(False), args)
    ref_value, ref_grads = _grads(loss(True), args)
    np.testing.assert_allclose(_np(value), _np(ref_value), rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(_np(g), _np(r), atol=1e-4)


def test_sort_by_expert_is_stable_and_counts():
    indices = np.array([[2, 0], [0, 1], [2, 1], [0, 2]], "int32")
    valid = np.array([[True, True], [True, True], [False, False], [True, True]])
    order, row_experts, sizes = dispatch.sort_by_expert(indices, valid, 3)
    np.testing.assert_array_equal(_np(sizes), [3, 1, 2])
    np.testing.assert_array_equal(_np(order), [1, 2, 6, 3, 0, 7, 4, 5])
    np.testing.assert_array_equal(_np(row_experts), [0, 0, 0, 1, 2, 2, 3, 3])


def test_slot_sources_invert_slots():
    slots = np.array([[0, 4, 1, 5, 3, 6, 2, 6]], "int32")  # E=2, C=3, trash=6
    sources, filled = dispatch.slot_sources(slots, 2, 3)
    np.testing.assert_array_equal(_np(filled)[0], [True, True, True, True, True, True])
    np.testing.assert_array_equal(_np(sources)[0], [0, 2, 6, 4, 1, 3])
    sources, filled = dispatch.slot_sources(np.array([[6, 0, 6, 3]], "int32"), 2, 3)
    np.testing.assert_array_equal(_np(filled)[0], [True, False, False, True, False, False])
    np.testing.assert_array_equal(_np(sources)[0][_np(filled)[0]], [1, 3])


def test_capacity_slots_order():
    # One group of 4 tokens, k=2, 2 experts, capacity 3.
    indices = np.array([[[0, 1], [0, 1], [1, 0], [0, 1]]], "int32")
    valid = np.ones((1, 4, 2), bool)
    slots, dispatched = dispatch.capacity_slots(indices, valid, 2, 3)
    # First choices: expert 0 gets tokens 0, 1, 3 (slots 0-2), expert 1 token 2.
    # Second choices: expert 1 gets tokens 0, 1 (slots 4, 5); the rest drop.
    np.testing.assert_array_equal(_np(slots)[0], [[0, 4], [1, 5], [3, 6], [2, 6]])
    np.testing.assert_array_equal(
        _np(dispatched)[0], [[True, True], [True, True], [True, False], [True, False]]
    )


def test_compute_capacity():
    assert dispatch.compute_capacity(1.25, 4096, 2, 8) == 1280
    assert dispatch.compute_capacity(1.0, 3, 1, 8) == 1
    assert dispatch.compute_capacity(0.01, 10, 1, 4) == 1


@pytest.mark.parametrize("jit_compile", [True, False])
def test_dropless_under_compilation_matches_eager(jit_compile):
    """TF graphs (XLA: "scan"; not: "ranges" with dynamic sizes) and JAX jit, gradients too."""
    from keras_moe.layers import SparseMoE

    layer = SparseMoE(4, 8, gated=True, activation="silu")
    x = np.random.default_rng(4).standard_normal((2, 9, 8)).astype("float32")
    eager = _np(layer(x))
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def loss_and_grads(t):
            with tf.GradientTape() as tape:
                y = layer(t, training=True)
                loss = tf.reduce_mean(y**2)
            return y, tape.gradient(loss, [v.value for v in layer.trainable_variables])

        y, grads = tf.function(loss_and_grads, jit_compile=jit_compile)(x)
        _, eager_grads = loss_and_grads(tf.constant(x))
    elif backend == "jax" and jit_compile:
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, t):
            y = layer.stateless_call(trainable, non_trainable, t, training=True)[0]
            return (y**2).mean(), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable, x)
        (_, _), eager_grads = jax.value_and_grad(loss, has_aux=True)(trainable, x)
    else:
        pytest.skip("Keras' torch backend runs eagerly; JAX compiles once")
    np.testing.assert_allclose(_np(y), eager, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        np.testing.assert_allclose(_np(g), _np(e), atol=1e-5)


def test_default_strategy_by_dtype(monkeypatch):
    """16-bit-only grouped kernels are chosen for 16-bit dtypes only (torch.compile, GPUs).

    A float32 model under `torch.compile` (Keras `jit_compile=True` on torch)
    failed in torch's compile-time check of `torch._grouped_mm` (bf16 only);
    CI's `layer_speed.py --smoke --torch-mode compile` runs the real thing.
    """
    backend = keras.backend.backend()
    for dtype in (None, "float32", "bfloat16"):
        assert dispatch.default_strategy(dtype) in dispatch.STRATEGIES
    if backend == "torch":
        import torch

        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert dispatch.default_strategy("float32") == "batched"
        assert dispatch.default_strategy("bfloat16") == "grouped"
    monkeypatch.setenv("KERAS_MOE_DROPLESS_STRATEGY", "scan")
    assert dispatch.default_strategy("float32") == "scan"
