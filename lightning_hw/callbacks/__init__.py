"""Lightning callbacks: PNG plots of a run (curves, confusion matrices, first-layer weights),
a stop on a NaN/infinite training loss, and predictions gathered from every process."""

from lightning_hw.callbacks.finite_loss import FiniteLossCheck, NonFiniteLossError
from lightning_hw.callbacks.plots import TrainingPlots, run_directory
from lightning_hw.callbacks.predictions import PredictionCollector

__all__ = ["FiniteLossCheck", "NonFiniteLossError", "PredictionCollector", "TrainingPlots", "run_directory"]
