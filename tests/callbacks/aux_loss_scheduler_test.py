"""AuxLossScheduler: a changed weight reaches the next compiled step (measured)."""

import keras
import numpy as np
import pytest

from keras_moe.callbacks import AuxLossScheduler
from keras_moe.callbacks import RouterMonitor
from keras_moe.callbacks import linear_schedule
from tests.callbacks.models import Recorder
from tests.callbacks.models import data
from tests.callbacks.models import moe_model


def test_a_changed_weight_reaches_the_next_steps_loss_by_epoch():
    """Epoch loss = task loss + weight * (unweighted load-balancing loss), per epoch.

    One step per epoch and a frozen optimizer: the task loss and the
    unweighted auxiliary loss stay the same, only the scheduled weight moves.
    """
    model = moe_model(load_balance_loss_weight=1.0)
    x, y = data(batches=1)
    weights = [0.0, 1.0, 3.0]
    history = model.fit(
        x, y, batch_size=2, epochs=3, verbose=0,
        callbacks=[AuxLossScheduler({"load_balance": lambda epoch: weights[epoch]}), RouterMonitor()],
    )
    aux = np.array(history.history["moe/load_balance_loss"])
    loss = np.array(history.history["loss"])
    assert aux[0] > 0.5
    np.testing.assert_allclose(aux, aux[0], rtol=1e-6)
    np.testing.assert_allclose(loss - loss[0], np.array(weights) * aux, rtol=1e-4, atol=1e-6)
    assert history.history["load_balance_loss_weight"] == weights
    assert float(keras.ops.convert_to_numpy(
        model.get_layer("moe").router.loss_weights["load_balance"])) == 3.0


def test_a_changed_weight_reaches_the_next_steps_loss_by_step():
    """Per step, across epochs: batch loss(t) - batch loss(0) = w(t) * aux."""
    model = moe_model(load_balance_loss_weight=1.0, router_z_loss_weight=1.0)
    x1, y1 = data(batches=1)
    x, y = np.concatenate([x1] * 3), np.concatenate([y1] * 3)  # the same batch, 3 steps
    recorder = Recorder()
    scheduler = AuxLossScheduler({"z": lambda step: 0.5 * step, "load_balance": 0.0}, unit="step")
    model.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0,
              callbacks=[scheduler, RouterMonitor(), recorder])
    batch_losses = []
    for epoch in range(2):
        means = [logs["loss"] for logs in recorder.batches[3 * epoch: 3 * epoch + 3]]
        # Keras logs the running mean of the epoch; recover each step's loss.
        batch_losses += [(n + 1) * m - n * (means[n - 1] if n else 0.0) for n, m in enumerate(means)]
    z = recorder.batches[0]["moe/z_loss"]
    np.testing.assert_allclose(np.array(batch_losses) - batch_losses[0], 0.5 * np.arange(6) * z,
                               rtol=1e-4, atol=1e-5)
    assert recorder.epochs[1]["z_loss_weight"] == 2.5


def test_a_loss_built_with_weight_zero_is_refused():
    model = moe_model()  # router_z_loss_weight=0: the z-loss is not in the step
    x, y = data(batches=1)
    with pytest.raises(ValueError, match="'z' loss of layers \\['moe'\\]: its weight was 0"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[AuxLossScheduler({"z": 1e-3})])


def test_a_loss_no_router_computes_is_refused():
    model = moe_model()
    x, y = data(batches=1)
    with pytest.raises(ValueError, match="no routed layer computes a loss named 'importance'"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[AuxLossScheduler({"importance": 1.0})])


def test_capacity_schedule_recompiles_and_takes_effect():
    model = moe_model(capacity_factor=0.25)
    x, y = data(batches=1)
    scheduler = AuxLossScheduler(capacity_factor=lambda epoch: 0.25 if epoch == 0 else 4.0)
    with pytest.warns(RuntimeWarning, match="'moe' 0.25 -> 4.0.*recompiles"):
        history = model.fit(x, y, epochs=2, verbose=0,
                            callbacks=[scheduler, RouterMonitor(max_dropped_fraction=None)])
    dropped = history.history["moe/dropped_fraction"]
    assert dropped[0] > 0.3 and dropped[1] == 0.0
    assert model.get_layer("moe").capacity_factor == 4.0
    assert history.history["capacity_factor"] == [0.25, 4.0]
    # Evaluation (eval_capacity_factor=None) uses the new factor too.
    model.evaluate(x, y, verbose=0)
    assert float(keras.ops.convert_to_numpy(model.get_layer("moe").dropped_count)) == 0.0


def test_capacity_schedule_refuses_dropless_layers():
    model = moe_model()
    x, y = data(batches=1)
    with pytest.raises(ValueError, match="\\['moe'\\] have no capacity factor"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[AuxLossScheduler(capacity_factor=2.0)])


def test_keras_learning_rate_schedules_are_schedules():
    model = moe_model()
    x, y = data(batches=2)
    ramp = keras.optimizers.schedules.PolynomialDecay(0.0, decay_steps=2, end_learning_rate=0.04)
    recorder = Recorder()
    model.fit(x, y, batch_size=2, epochs=2, verbose=0,
              callbacks=[AuxLossScheduler({"load_balance": ramp}, unit="step"), recorder])
    np.testing.assert_allclose([logs["load_balance_loss_weight"] for logs in recorder.epochs],
                               [0.02, 0.04], rtol=1e-6)


def test_a_schedule_giving_a_negative_weight_fails_clearly():
    model = moe_model()
    x, y = data(batches=1)
    with pytest.raises(ValueError, match="finite value >= 0. Received: -1.0 at t=1"):
        model.fit(x, y, epochs=2, verbose=0,
                  callbacks=[AuxLossScheduler({"load_balance": lambda epoch: -float(epoch)})])


def test_linear_schedule():
    decay = linear_schedule(1.0, 0.0, duration=2, delay=1)
    assert [decay(t) for t in range(5)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="`duration`"):
        linear_schedule(0.0, 1.0, duration=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "needs `weights` or `capacity_factor`"),
        ({"weights": 0.1}, "`weights` must be a dict"),
        ({"weights": {"z": -1.0}}, "`weights\\['z'\\]` must be a number >= 0"),
        ({"weights": {"z": "high"}}, "`weights\\['z'\\]` must be a number, a function"),
        ({"capacity_factor": 0.0}, "`capacity_factor` must be a number > 0"),
        ({"weights": {"z": 1.0}, "unit": "batch"}, "`unit`"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AuxLossScheduler(**kwargs)
