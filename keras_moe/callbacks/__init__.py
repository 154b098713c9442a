"""Keras callbacks that watch and steer routing during `fit`.

`RouterMonitor` logs the routing statistics of every routed layer,
`AuxLossScheduler` changes auxiliary-loss weights (and capacity factors) on a
schedule, `ExpertBiasBalancer` applies aux-loss-free bias balancing every N
steps. All three work on JAX, TensorFlow and PyTorch.
"""

from keras_moe.callbacks.aux_loss_scheduler import AuxLossScheduler
from keras_moe.callbacks.aux_loss_scheduler import linear_schedule
from keras_moe.callbacks.expert_bias_balancer import ExpertBiasBalancer
from keras_moe.callbacks.router_monitor import RouterMonitor
