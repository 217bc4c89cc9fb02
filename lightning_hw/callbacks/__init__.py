"""Lightning callbacks: PNG plots of a run (curves, confusion matrices, first-layer weights)."""

from lightning_hw.callbacks.plots import TrainingPlots, run_directory

__all__ = ["TrainingPlots", "run_directory"]
