"""Ready-made models built from keras_moe layers."""

from keras_moe.models.multi_task import MultiTaskModel
from keras_moe.models.shared_bottom import SharedBottomModel
