"""Training on Hugging Face Accelerate: a generic trainer (loop, EMA, checkpoints, exact resume, logging)
and per-method recipes that build the model, loss and validation from a run config."""

from blindsr.train.config import DataConfig, OptimConfig, RunConfig, TrainConfig, load_config
from blindsr.train.ema import EMA
from blindsr.train.logging import plot_losses
from blindsr.train.trainer import Trainer, TrainResult, lr_at

__all__ = ["EMA", "DataConfig", "OptimConfig", "RunConfig", "TrainConfig", "TrainResult", "Trainer",
           "load_config", "lr_at", "plot_losses"]
