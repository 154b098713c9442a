"""keras-moe: Mixture-of-Experts layers for Keras 3 (JAX, TensorFlow, PyTorch)."""

from keras_moe import dispatch
from keras_moe import distribution
from keras_moe import experts
from keras_moe import layers
from keras_moe import losses
from keras_moe import models
from keras_moe import routers
from keras_moe.version import __version__

__all__ = [
    "dispatch",
    "distribution",
    "experts",
    "layers",
    "losses",
    "models",
    "routers",
    "__version__",
]
