"""Lightning callbacks: PNG plots of a run (curves, confusion matrices, first-layer weights),
a stop on a NaN/infinite training loss, predictions gathered from every process, and
checkpoints whose last.ckpt follows every epoch."""

from lightning_hw.callbacks.checkpoint import LastEpochCheckpoint
from lightning_hw.callbacks.finite_loss import FiniteLossCheck, NonFiniteLossError
from lightning_hw.callbacks.plots import TrainingPlots, run_directory
from lightning_hw.callbacks.predictions import PredictionCollector

__all__ = [
    "FiniteLossCheck",
    "LastEpochCheckpoint",
    "NonFiniteLossError",
    "PredictionCollector",
    "TrainingPlots",
    "run_directory",
]
