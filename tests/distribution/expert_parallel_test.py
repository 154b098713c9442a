"""Expert parallelism on 8 virtual JAX devices (see conftest.py).

On a (2, 4) batch x expert mesh and on a 1-D mesh used for both, in
capacity and in dropless mode: each device holds its share of every expert
variable (before and after `fit`), outputs and gradients equal the
single-device model's, the compiled training step exchanges tokens with an
all-to-all and gathers no expert kernel, and `.keras` files move between
one device and the mesh.
"""

import re

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe.backend import expert_parallel as ep_backend

pytestmark = [
    pytest.mark.multi_device,
    pytest.mark.skipif(keras.backend.backend() != "jax", reason="Keras distributes on JAX only"),
]

E, HIDDEN, WIDTH, OUT = 8, 12, 20, 3
BATCH, LENGTH = 8, 4
TOL = 1e-5


def mesh_and_distribution(kind, **kwargs):
    devices = keras.distribution.list_devices()
    if kind == "2d":
        mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "expert"], devices)
        return keras_moe.distribution.expert_parallel(mesh, **kwargs)
    if kind == "1d":
        mesh = keras.distribution.DeviceMesh((8,), ["expert"], devices)
        return keras_moe.distribution.expert_parallel(mesh, batch_axis="expert", **kwargs)
    mesh = keras.distribution.DeviceMesh((2, 2, 2), ["batch", "expert", "model"], devices)
    return keras_moe.distribution.expert_parallel(mesh, model_axis="model", **kwargs)


def build(mode, num_experts=E, **layer_kwargs):
    capacity = {"capacity_factor": 2.0, "group_size": 4} if mode == "capacity" else {}
    inputs = keras.Input((LENGTH, HIDDEN))
    mask = keras.Input((LENGTH,), dtype="bool")
    h = keras.layers.Dense(HIDDEN, name="pre")(inputs)
    h = keras_moe.layers.SparseMoE(
        num_experts, WIDTH, gated=True, use_bias=True, activation="silu",
        load_balance_loss_weight=1e-2, router_z_loss_weight=1e-3, name="moe",
        **capacity, **layer_kwargs,
    )(h, mask=mask)
    outputs = keras.layers.Dense(OUT, name="head")(h)
    return keras.Model([inputs, mask], outputs)


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, LENGTH, HIDDEN)).astype("float32")
    mask = rng.random((BATCH, LENGTH)) > 0.25
    y = rng.normal(size=(BATCH, LENGTH, OUT)).astype("float32")
    return x, mask, y


def loss_and_gradients(model, x, mask, y):
    """Loss (with the router losses), outputs and gradients of a training call."""
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss_fn(trainable):
        outputs, _, losses = model.stateless_call(
            trainable, non_trainable, [x, mask], training=True, return_losses=True
        )
        return jnp.mean((outputs - y) ** 2) + sum(losses), outputs

    (loss, outputs), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trainable)
    return float(loss), np.asarray(outputs), [np.asarray(g) for g in grads]


def compiled_call(layer, inputs):
    """Outputs and non-trainable state of a jit-compiled inference call
    (eager calls on sharded arrays dispatch op by op, slowly)."""
    import jax

    def call(trainable, non_trainable, inputs):
        return layer.stateless_call(trainable, non_trainable, inputs)

    outputs, state = jax.jit(call)(
        [v.value for v in layer.trainable_variables],
        [v.value for v in layer.non_trainable_variables],
        inputs,
    )
    paths = [v.path for v in layer.non_trainable_variables]
    return np.asarray(outputs), {p: np.asarray(v) for p, v in zip(paths, state)}


def expert_variables(model):
    return [v for v in model.variables if re.search(r"experts/(up|gate|down)_(kernel|bias)$", v.path)]


def assert_sharded(model, distribution):
    """Each device holds 1/n of every expert variable, n the expert axis."""
    mesh = distribution.device_mesh
    shards = dict(zip(mesh.axis_names, mesh.shape))[distribution.expert_axis]
    variables = expert_variables(model)
    assert len(variables) == 6
    for variable in variables:
        value = variable.value
        assert len(value.addressable_shards) == 8
        for shard in value.addressable_shards:
            assert shard.data.shape[0] == variable.shape[0] // shards, variable.path
    router = model.get_layer("moe").router.kernel.value
    assert all(s.data.shape == router.shape for s in router.addressable_shards)


def collectives(hlo):
    """`(kind, result type)` of each collective in compiled HLO text."""
    found = []
    for line in hlo.splitlines():
        match = re.match(
            r"\s*(?:ROOT )?%\S+ = (.+?) (all-to-all|all-gather|all-reduce|collective-permute"
            r"|reduce-scatter)(?:-start)?\(",
            line,
        )
        if match:
            found.append((match.group(2), match.group(1)))
    return found


def compiled_train_step(model, distribution, x, mask, y):
    """The HLO text of Keras' own training step, compiled for the mesh."""
    import jax

    model.optimizer.build(model.trainable_variables)
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    batch = jax.tree.map(
        lambda a: jax.device_put(a, distribution.get_data_layout(a.shape).backend_layout),
        ([x, mask], y),
    )
    return jax.jit(model.train_step).lower(state, batch).compile().as_text()


@pytest.mark.parametrize("mesh", ["2d", "1d"])
@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_matches_single_device_and_exchanges_tokens(mesh, mode):
    keras.utils.set_random_seed(0)
    single = build(mode)
    x, mask, y = data()
    want_loss, want_out, want_grads = loss_and_gradients(single, x, mask, y)

    distribution = mesh_and_distribution(mesh)
    with distribution.scope():
        model = build(mode)
        model.set_weights(single.get_weights())
        assert_sharded(model, distribution)
        loss, out, grads = loss_and_gradients(model, x, mask, y)
        np.testing.assert_allclose(out, want_out, atol=TOL, rtol=0)
        assert abs(loss - want_loss) <= TOL
        names = [v.path for v in model.trainable_variables]
        for name, got, want in zip(names, grads, want_grads):
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=name)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        hlo = compiled_train_step(model, distribution, x, mask, y)
        found = collectives(hlo)
        kinds = {kind for kind, _ in found}
        assert "all-to-all" in kinds, found
        # Nothing of the experts' width travels in an all-gather: no expert
        # kernel (or its gradient) is ever gathered.
        gathered = [t for kind, t in found if kind == "all-gather"]
        assert not any(re.search(rf"\b{WIDTH}\b", t) for t in gathered), gathered

        twice = [np.concatenate([a, a]) for a in (x, mask, y)]
        history = model.fit(twice[:2], twice[2], batch_size=BATCH, epochs=1, verbose=0)  # 2 steps
        assert np.isfinite(history.history["loss"]).all()
        assert_sharded(model, distribution)


@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_expert_tensor_parallel_matches_single_device(mode):
    keras.utils.set_random_seed(1)
    single = build(mode, shared_intermediate_dim=8)
    x, mask, y = data(1)
    want_loss, want_out, want_grads = loss_and_gradients(single, x, mask, y)
    distribution = mesh_and_distribution("3d")
    with distribution.scope():
        model = build(mode, shared_intermediate_dim=8)
        model.set_weights(single.get_weights())
        up = model.get_layer("moe").experts.up_kernel.value
        # (E, hidden, width): experts over 2 devices, width over 2 more.
        assert {s.data.shape for s in up.addressable_shards} == {(E // 2, HIDDEN, WIDTH // 2)}
        shared = model.get_layer("moe").shared_expert.down_kernel.value
        assert {s.data.shape for s in shared.addressable_shards} == {(4, HIDDEN)}
        loss, out, grads = loss_and_gradients(model, x, mask, y)
    np.testing.assert_allclose(out, want_out, atol=TOL, rtol=0)
    assert abs(loss - want_loss) <= TOL
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def _ragged_all_to_all_reference(operand, output, input_offsets, send_sizes, output_offsets,
                                 recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all`'s documented semantics, from all_gathers
    (XLA:CPU does not implement the collective itself)."""
    import jax
    import jax.numpy as jnp

    me = jax.lax.axis_index(axis_name)
    operands = jax.lax.all_gather(operand, axis_name)  # (n, N, d)
    starts = jax.lax.all_gather(input_offsets, axis_name)  # (n senders, n receivers)
    sizes = jax.lax.all_gather(send_sizes, axis_name)
    offsets = jax.lax.all_gather(output_offsets, axis_name)
    rows = jnp.arange(output.shape[0])
    for source in range(operands.shape[0]):
        start, size, offset = starts[source, me], sizes[source, me], offsets[source, me]
        inside = (rows >= offset) & (rows < offset + size)
        taken = jnp.take(operands[source], jnp.clip(rows - offset + start, 0, operand.shape[0] - 1), axis=0)
        output = jnp.where(inside[:, None], taken, output)
    return output


@pytest.mark.parametrize("mesh", ["2d", "1d"])
def test_ragged_exchange_offsets(mesh, monkeypatch):
    """The ragged exchange's offsets, checked with a reference collective."""
    monkeypatch.setattr(ep_backend, "_ragged_all_to_all", _ragged_all_to_all_reference)
    keras.utils.set_random_seed(2)
    single = build("dropless")
    x, mask, y = data(2)
    _, want_out, want_grads = loss_and_gradients(single, x, mask, y)
    distribution = mesh_and_distribution(mesh, exchange="ragged_all_to_all")
    with distribution.scope():
        model = build("dropless")
        model.set_weights(single.get_weights())
        _, out, grads = loss_and_gradients(model, x, mask, y)
    np.testing.assert_allclose(out, want_out, atol=TOL, rtol=0)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_ragged_exchange_lowers_to_the_collective():
    """With the real collective the step lowers (XLA:CPU cannot compile it)."""
    import jax

    distribution = mesh_and_distribution("1d", exchange="ragged_all_to_all")
    with distribution.scope():
        layer = keras_moe.layers.SparseMoE(E, WIDTH, name="moe")
        layer.build((None, HIDDEN))
        x = np.random.default_rng(3).normal(size=(16, HIDDEN)).astype("float32")

        def call(trainable, non_trainable, x):
            return layer.stateless_call(trainable, non_trainable, x)[0]

        lowered = jax.jit(call).lower(
            [v.value for v in layer.trainable_variables],
            [v.value for v in layer.non_trainable_variables],
            x,
        )
    assert "ragged_all_to_all" in lowered.as_text()


def test_every_token_is_computed_in_the_worst_case():
    """All tokens of every device routed to one device's experts: dropless
    keeps them all (the buffers are sized for it)."""
    keras.utils.set_random_seed(4)
    layer_single = keras_moe.layers.SparseMoE(E, WIDTH, top_k=2, name="moe")
    x = np.random.default_rng(4).normal(size=(BATCH * LENGTH, HIDDEN)).astype("float32")
    layer_single.build(x.shape)
    # A router that sends every token to experts 0 and 1 (device 0).
    kernel = np.zeros((HIDDEN, E), "float32")
    layer_single.router.kernel.assign(kernel)
    layer_single.router.expert_bias.assign(np.array([2.0, 1.0] + [0.0] * (E - 2), "float32"))
    want, _ = compiled_call(layer_single, x)
    distribution = mesh_and_distribution("1d")
    with distribution.scope():
        layer = keras_moe.layers.SparseMoE(E, WIDTH, top_k=2, name="moe")
        layer.build(x.shape)
        layer.set_weights(layer_single.get_weights())
        got, state = compiled_call(layer, x)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    counts = state["moe/expert_counts"]
    assert counts[0] == counts[1] == BATCH * LENGTH
    assert state["moe/dropped_count"] == 0.0


def test_uneven_token_count_is_padded():
    keras.utils.set_random_seed(5)
    single = keras_moe.layers.SparseMoE(E, WIDTH, name="moe")
    x = np.random.default_rng(5).normal(size=(3, 5, HIDDEN)).astype("float32")  # 15 tokens
    single.build(x.shape)
    want, _ = compiled_call(single, x)
    with mesh_and_distribution("2d").scope():
        layer = keras_moe.layers.SparseMoE(E, WIDTH, name="moe")
        layer.build(x.shape)
        layer.set_weights(single.get_weights())
        got, _ = compiled_call(layer, x)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_save_on_mesh_load_on_one_device_and_back(tmp_path):
    x, mask, _ = data(6)
    distribution = mesh_and_distribution("2d")
    keras.utils.set_random_seed(6)
    with distribution.scope():
        model = build("dropless")
        want, _ = compiled_call(model, [x, mask])
        model.save(tmp_path / "mesh.keras")
    single = keras.models.load_model(tmp_path / "mesh.keras")
    np.testing.assert_allclose(compiled_call(single, [x, mask])[0], want, atol=TOL, rtol=0)
    single.save(tmp_path / "single.keras")
    with distribution.scope():
        again = keras.models.load_model(tmp_path / "single.keras")
        assert_sharded(again, distribution)
        np.testing.assert_allclose(compiled_call(again, [x, mask])[0], want, atol=TOL, rtol=0)


def test_indivisible_experts_fail_when_built():
    with mesh_and_distribution("2d").scope():
        with pytest.raises(ValueError, match=r"'moe/experts'.*num_experts=6.*4 devices.*'expert'"):
            build("dropless", num_experts=6)


def test_multitask_experts_are_sharded():
    keras.utils.set_random_seed(7)
    x = np.random.default_rng(7).normal(size=(8, HIDDEN)).astype("float32")

    def mmoe():
        inputs = keras.Input((HIDDEN,))
        outputs = keras_moe.layers.MMoE(num_tasks=2, num_experts=8, expert_units=[16, 8])(inputs)
        return keras.Model(inputs, outputs)

    single = mmoe()
    want = compiled_call(single, x)[0]
    with mesh_and_distribution("1d").scope():
        model = mmoe()
        model.set_weights(single.get_weights())
        kernel = next(v for v in model.variables if v.path.endswith("experts/kernel_0"))
        assert {s.data.shape for s in kernel.value.addressable_shards} == {(1, HIDDEN, 16)}
        got = compiled_call(model, x)[0]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=TOL, rtol=0)


def test_mixed_precision_matches_single_device():
    keras.config.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(8)
    single = build("dropless")
    x, mask, y = data(8)
    want_loss, want_out, _ = loss_and_gradients(single, x, mask, y)
    with mesh_and_distribution("2d").scope():
        model = build("dropless")
        model.set_weights(single.get_weights())
        loss, out, grads = loss_and_gradients(model, x, mask, y)
    np.testing.assert_allclose(out.astype("float32"), want_out.astype("float32"), atol=3e-2, rtol=0)
    assert abs(loss - want_loss) < 1e-2
    assert all(np.isfinite(g.astype("float32")).all() for g in grads)


def test_expert_dropout_trains():
    """Dropout on the experts' hidden units, drawn per device in the exchange."""
    inputs = keras.Input((LENGTH, HIDDEN))
    with mesh_and_distribution("1d").scope():
        outputs = keras_moe.layers.SwitchFFN(
            E, WIDTH, capacity_factor=None, eval_capacity_factor=None, expert_dropout=0.5
        )(inputs)
        model = keras.Model(inputs, outputs)
        x, _, _ = data(9)
        _, train_a, grads = loss_and_gradients_plain(model, x)
        _, train_b, _ = loss_and_gradients_plain(model, x)
        infer, _ = compiled_call(model, x)
    assert all(np.isfinite(g).all() for g in grads)
    assert not np.allclose(train_a, infer)  # dropout acts in training only
    assert not np.allclose(train_a, train_b)  # a new mask each call


def loss_and_gradients_plain(model, x):
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss_fn(trainable, non_trainable):
        outputs, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        return jnp.mean(outputs**2), (outputs, non_trainable)

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, (outputs, non_trainable)), grads = step(trainable, non_trainable)
    # Keep the advanced seed for the next call.
    for variable, value in zip(model.non_trainable_variables, non_trainable):
        variable.assign(value)
    return float(loss), np.asarray(outputs), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("kind", ["expert_choice", "soft"])
def test_expert_choice_and_soft_moe_match_single_device(kind):
    """Expert Choice fills the same capacity buffers (router-named slots);
    Soft MoE runs its experts on slot buffers through GSPMD."""

    def model():
        inputs = keras.Input((LENGTH, HIDDEN))
        if kind == "expert_choice":
            layer = keras_moe.layers.ExpertChoiceMoE(E, WIDTH, capacity_factor=2.0, group_size=4, name="moe")
        else:
            layer = keras_moe.layers.SoftMoE(E, 2, WIDTH, name="moe")
        return keras.Model(inputs, keras.layers.Dense(OUT)(layer(inputs)))

    keras.utils.set_random_seed(10)
    single = model()
    x, _, y = data(10)
    want, _ = compiled_call(single, x)
    distribution = mesh_and_distribution("2d")
    with distribution.scope():
        sharded = model()
        sharded.set_weights(single.get_weights())
        up = sharded.get_layer("moe").experts.up_kernel.value
        assert {s.data.shape for s in up.addressable_shards} == {(E // 4, HIDDEN, WIDTH)}
        got, _ = compiled_call(sharded, x)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
