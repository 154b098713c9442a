"""Auxiliary router losses."""

from keras_moe.losses.router_losses import cv_squared
from keras_moe.losses.router_losses import importance_loss
from keras_moe.losses.router_losses import load_balancing_loss
from keras_moe.losses.router_losses import load_loss
from keras_moe.losses.router_losses import prob_in_top_k
from keras_moe.losses.router_losses import router_z_loss
