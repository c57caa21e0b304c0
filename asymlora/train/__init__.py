"""Training: run configs, the accelerate loop with router losses and exact resume, checkpoints."""

from .checkpoint import CheckpointError
from .config import RunConfig, load_run_config, run_config_from_dict
from .trainer import TrainingError, TrainResult, train

__all__ = ["CheckpointError", "RunConfig", "TrainResult", "TrainingError", "load_run_config", "run_config_from_dict", "train"]
