"""keras-moe: Mixture-of-Experts layers for Keras 3 (JAX, TensorFlow, PyTorch)."""

from keras_moe import callbacks
from keras_moe import dispatch
from keras_moe import distribution
from keras_moe import experts
from keras_moe import layers
from keras_moe import losses
from keras_moe import models
from keras_moe import plot
from keras_moe import routers
from keras_moe.statistics import routing_stats
from keras_moe.version import __version__

__all__ = [
    "callbacks",
    "dispatch",
    "distribution",
    "experts",
    "layers",
    "losses",
    "models",
    "plot",
    "routers",
    "routing_stats",
    "__version__",
]
