"""Training: config files, the training loop, checkpoints and resume."""
from sparsesr.train.config import TrainConfig, load_config, resume_config
from sparsesr.train.loop import TrainResult, train, validate
from sparsesr.train.runlog import read_log

__all__ = ["TrainConfig", "TrainResult", "load_config", "read_log", "resume_config", "train", "validate"]
