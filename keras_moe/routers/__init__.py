"""Routers decide which experts see which tokens; they move no data."""

from keras_moe.routers.top_k_router import TopKRouter
