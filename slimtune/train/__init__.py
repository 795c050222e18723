"""Training: config, loss, gradient accumulation, the loop and the recipe that wires them."""

from slimtune.train.config import TrainConfig
from slimtune.train.run import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
