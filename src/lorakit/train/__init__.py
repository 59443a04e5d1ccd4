"""Training: run configs, the loop, evaluation, checkpoints.

from lorakit.train import load_config, run_training
summary = run_training(load_config("my.yaml", ["--train.steps", "100"]), callbacks=[print])
"""

from lorakit.train.config import RunConfig, load_config
from lorakit.train.loop import TrainingError, train_loop
from lorakit.train.run import run_training

__all__ = ["RunConfig", "TrainingError", "load_config", "run_training", "train_loop"]
