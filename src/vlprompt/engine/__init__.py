"""Training and evaluation engine: one plain loop for every method, checkpoints, resume,
``torchrun`` distribution, and the run API the CLI and the protocol runners use."""

from .checkpoint import load_checkpoint, read_header, save_checkpoint
from .evaluate import compute_metrics, evaluate_method, format_result
from .optim import build_optimizer, lr_at_epoch
from .run import evaluate_run, predict_with_checkpoint, run_experiment
from .train import NonFiniteLossError, seed_everything, train_method

__all__ = ["run_experiment", "evaluate_run", "predict_with_checkpoint", "train_method",
           "evaluate_method", "compute_metrics", "format_result", "build_optimizer", "lr_at_epoch",
           "load_checkpoint", "read_header", "save_checkpoint", "NonFiniteLossError",
           "seed_everything"]
