"""Auxiliary router losses."""

from keras_moe.losses.router_losses import load_balancing_loss
from keras_moe.losses.router_losses import router_z_loss
