"""ExpertBiasBalancer: bias updates from counts accumulated over N compiled steps."""

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe.callbacks import ExpertBiasBalancer
from keras_moe.experts import StackedExperts
from keras_moe.layers import MoE
from tests.callbacks.models import data
from tests.callbacks.models import moe_model
from tests.layers.moe_test import HashRouter


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_bias_follows_the_counts_of_each_window():
    """Replays the windows eagerly: same counts, same sign updates, same bias."""
    rate, every = 0.05, 2
    model = moe_model(score_func="sigmoid")
    x, y = data(batches=4)
    balancer, biases = ExpertBiasBalancer(rate, every_n_steps=every), []
    watch = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: biases.append(
        _np(watch.model.get_layer("moe").router.expert_bias)))
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[balancer, watch])
    assert balancer.updates == 2
    layer = model.get_layer("moe")
    assert not _np(layer.accumulated_counts).any()  # cleared after each update
    np.testing.assert_array_equal(biases[0], np.zeros(4))  # no update before step 2

    layer.router.expert_bias.assign(np.zeros(4, "float32"))
    for window in range(2):
        counts = np.zeros(4)
        for b in range(window * every, (window + 1) * every):
            _, routing = layer(x[2 * b: 2 * b + 2], return_routing=True)
            counts += np.bincount(_np(routing["expert_indices"]).ravel(), minlength=4)
        bias = _np(layer.router.expert_bias) + rate * np.sign(counts.mean() - counts)
        layer.router.expert_bias.assign(bias.astype("float32"))
        np.testing.assert_allclose(biases[(window + 1) * every - 1], bias, atol=1e-7)
    assert np.abs(biases[every - 1]).max() == rate


def test_windows_run_across_epochs():
    model = moe_model()
    x, y = data(batches=2)
    balancer = ExpertBiasBalancer(1e-3, every_n_steps=3)
    model.fit(x, y, batch_size=2, epochs=3, verbose=0, callbacks=[balancer])
    assert balancer.updates == 2  # 6 steps
    # A new fit starts a new window: 2 steps < 3, no update, the counts wait.
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[balancer])
    assert balancer.updates == 0
    steps, samples, tokens, top_k = 2, 2, 6, 2
    assert _np(model.get_layer("moe").accumulated_counts).sum() == steps * samples * tokens * top_k


def test_refuses_a_router_that_already_updates_its_bias():
    model = moe_model(expert_bias_update_rate=1e-3)
    x, y = data(batches=1)
    with pytest.raises(ValueError, match="already update their expert bias"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[ExpertBiasBalancer(1e-3)])


# The hash router's kernel gets no gradient (it routes by position).
@pytest.mark.filterwarnings("ignore:Gradients do not exist:UserWarning")
def test_refuses_layers_without_an_expert_bias():
    inputs = keras.Input((6, 4))
    hidden = keras_moe.layers.SparseMoE(4, 6, name="topk")(inputs)
    outputs = MoE(HashRouter(3), StackedExperts(3, 5), name="hashed")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile("sgd", "mse")
    x, y = data(batches=1)
    # Every layer that can be balanced is, the others are skipped ...
    balancer = ExpertBiasBalancer(1e-3)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[balancer])
    assert balancer.updates == 1
    # ... but naming one that cannot is an error.
    with pytest.raises(ValueError, match="Layers without: \\['hashed'\\]"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[ExpertBiasBalancer(1e-3, layers="hashed")])


@pytest.mark.parametrize(
    "kwargs, name",
    [({"update_rate": 0.0}, "update_rate"), ({"update_rate": 1e-3, "every_n_steps": 0}, "every_n_steps")],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        ExpertBiasBalancer(**kwargs)
