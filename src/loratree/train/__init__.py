"""Fine-tuning: data, the training loop, checkpoints, and torchrun support."""

from loratree.train.config import TrainConfig
from loratree.train.loop import TrainResult, fit, save, setup, train

__all__ = ["TrainConfig", "TrainResult", "fit", "save", "setup", "train"]
