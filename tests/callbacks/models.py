"""Small models and helpers shared by the callback tests."""

import keras
import numpy as np

import keras_moe

HIDDEN = 4
TOKENS = 6


def moe_model(name="moe", **kwargs):
    """`Input (TOKENS, HIDDEN)` -> SparseMoE, compiled with a frozen optimizer.

    The learning rate is 0, so every step sees the same weights: a step's
    loss and statistics can be recomputed outside `fit`.
    """
    kwargs.setdefault("num_experts", 4)
    kwargs.setdefault("intermediate_dim", 6)
    inputs = keras.Input((TOKENS, HIDDEN))
    model = keras.Model(inputs, keras_moe.layers.SparseMoE(name=name, **kwargs)(inputs))
    model.compile(keras.optimizers.SGD(learning_rate=0.0), "mse")
    return model


def data(batches, batch_size=2, seed=0):
    x = np.random.default_rng(seed).standard_normal((batches * batch_size, TOKENS, HIDDEN))
    return x.astype("float32"), np.zeros((batches * batch_size, TOKENS, HIDDEN), "float32")


class Recorder(keras.callbacks.Callback):
    """Keeps a copy of every batch's and epoch's logs, as later callbacks see them."""

    def __init__(self):
        super().__init__()
        self.batches, self.epochs = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(dict(logs))

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(dict(logs))
