"""Training: the recipe (`TrainConfig`) and the trainer (`train`, `evaluate`)."""
from topo.train.config import TrainConfig, TrainResult
from topo.train.trainer import evaluate, train

__all__ = ["TrainConfig", "TrainResult", "evaluate", "train"]
