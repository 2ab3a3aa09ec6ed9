"""Training: config files, the training loop, checkpoints and resume."""
from sparsesr.train.config import TrainConfig, load_config
from sparsesr.train.loop import TrainResult, train, validate

__all__ = ["TrainConfig", "TrainResult", "load_config", "train", "validate"]
