"""A callback that draws the training curves, confusion matrices and first-layer
weights of a run as PNG files in the run directory.

Figures are drawn with matplotlib's Agg canvas on `matplotlib.figure.Figure`
objects, never through pyplot, so the user's global backend is left alone and
no figure stays registered (and alive) after it is written.

What the callback reads from the LightningModule (each part is optional; a
module without it simply gets no such plot):

- logged metrics `train_loss`, `train_acc` (epoch aggregates), `val_loss`,
  `val_acc` in `trainer.callback_metrics`;
- `class_names: list[str]`;
- `confusion_matrices: dict[str, Tensor]` with keys "val" / "test": integer
  counts, rows = true class, columns = predicted class;
- `first_layer_weights() -> Tensor` of shape (K, C, H, W).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pytorch_lightning.trainer.states import TrainerFn

# Keys of `TrainingPlots.history`; each holds (epoch position, value) points.
HISTORY_KEYS = ("train_loss_step", "train_loss", "train_acc", "val_loss", "val_acc")


def run_directory(trainer: pl.Trainer) -> Path:
    """A run's folder: the logger's version folder, else `trainer.default_root_dir`.

    `trainer.log_dir` broadcasts from rank zero, so under DDP every rank must call this.
    """
    return Path(trainer.log_dir if trainer.log_dir is not None else trainer.default_root_dir)


def _metric_value(metrics: dict[str, torch.Tensor], name: str) -> float | None:
    """The epoch value of a logged metric: `<name>_epoch` when it was logged both
    on step and on epoch, else `<name>`; None when it was not logged."""
    value = metrics.get(f"{name}_epoch", metrics.get(name))
    return None if value is None else float(value)


def _step_loss(outputs: object) -> torch.Tensor | None:
    """The loss in what training_step returned (a dict with "loss" or a tensor)."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    return outputs if isinstance(outputs, torch.Tensor) else None


def _save(figure: Figure, path: Path) -> None:
    """Write the figure as PNG via a temporary file, so an interrupted run never
    leaves a half-written plot behind."""
    FigureCanvasAgg(figure)
    temporary = path.with_name(path.name + ".tmp")
    figure.savefig(temporary, format="png", dpi=100)
    os.replace(temporary, path)
    figure.clear()


def weights_mosaic(weights: torch.Tensor, max_filters: int) -> tuple[np.ndarray, str]:
    """Tile the first `max_filters` filters of `weights` (K, C, H, W) into one image.

    Each filter is min-max scaled to [0, 1] over all its values (as the report's
    templates). C=3 is shown as RGB, any other C as grayscale: C=1 as is, other
    channel counts as the mean over channels. Filters are separated by a
    one-pixel white border. Returns the image ((rows, cols) or (rows, cols, 3))
    and a short description of the colour mapping for the title.
    """
    if weights.dim() != 4 or min(weights.shape) == 0:
        raise ValueError(
            f"first_layer_weights() must return a non-empty (K, C, H, W) tensor, got shape {tuple(weights.shape)}"
        )
    filters = weights.detach().to("cpu", torch.float64)[:max_filters]
    channels = filters.shape[1]
    if channels == 3:
        mapping = "RGB"
    elif channels == 1:
        mapping = "grayscale"
    else:
        filters = filters.mean(dim=1, keepdim=True)
        mapping = f"mean over {channels} channels"
    flat = filters.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    span = (flat.max(dim=1).values.view(-1, 1, 1, 1) - low).clamp_min(torch.finfo(torch.float64).tiny)
    scaled = ((filters - low) / span).permute(0, 2, 3, 1).numpy()  # (K, H, W, C)

    count, height, width, depth = scaled.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    mosaic = np.ones((rows * (height + 1) + 1, columns * (width + 1) + 1, depth))
    for index in range(count):
        top = 1 + (index // columns) * (height + 1)
        left = 1 + (index % columns) * (width + 1)
        mosaic[top : top + height, left : left + width] = scaled[index]
    return (mosaic if depth == 3 else mosaic[..., 0]), mapping


class TrainingPlots(pl.Callback):
    """Draw the run's curves, confusion matrices and first-layer weights as PNGs.

    Files, in `<run dir>/<dirname>/` (the run dir is `trainer.log_dir`, or
    `trainer.default_root_dir` when there is no logger directory):
    `loss.png` (train loss per step, faint, and train/val loss per epoch),
    `accuracy.png` (train/val accuracy per epoch), `confusion_matrix_val.png`,
    `confusion_matrix_test.png` and `first_layer_weights.png`. The curves, the
    validation confusion matrix and the weights are refreshed after every
    validation run during fit (so an interrupted run still has plots) and
    written at the end of fit; the test confusion matrix and the weights at the
    end of test. Only global rank zero writes. The history survives a resume
    from a checkpoint.

    Args:
        dirname: Folder inside the run directory that receives the PNG files.
        max_filters: Show at most this many first-layer filters in the weights grid.
    """

    def __init__(self, dirname: str = "plots", max_filters: int = 64) -> None:
        super().__init__()
        if not isinstance(dirname, str) or not dirname.strip():
            raise ValueError(f"dirname must be a non-empty folder name, got {dirname!r}")
        if isinstance(max_filters, bool) or not isinstance(max_filters, int) or max_filters < 1:
            raise ValueError(f"max_filters must be a positive int, got {max_filters!r}")
        self.dirname = dirname
        self.max_filters = max_filters
        # (epoch position, value) points; the x axis of both curves is in epochs,
        # with a step at `epoch + (batch_idx + 1) / num_training_batches`.
        self.history: dict[str, list[tuple[float, float]]] = {key: [] for key in HISTORY_KEYS}
        # Every PNG written so far, in the order first written (for the CLI to print).
        self.written: list[Path] = []
        self._epoch_position = 0.0
        self._plot_dir: Path | None = None

    # -- Lightning hooks -----------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._plot_dir = run_directory(trainer) / self.dirname

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        batches = trainer.num_training_batches
        # An epoch of unknown length puts its steps at the epoch's end.
        fraction = (batch_idx + 1) / batches if math.isfinite(batches) and batches > 0 else 1.0
        self._epoch_position = trainer.current_epoch + min(fraction, 1.0)
        loss = _step_loss(outputs)
        if loss is None:
            return
        if pl_module.automatic_optimization:
            # Lightning hands on the loss divided by accumulate_grad_batches.
            loss = loss * trainer.accumulate_grad_batches
        self.history["train_loss_step"].append((self._epoch_position, float(loss)))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after this epoch's validation; the epoch aggregates are ready here.
        self._record(trainer, "train", trainer.current_epoch + 1.0)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the module's on_validation_epoch_end, which updates the confusion matrix.
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            self._record(trainer, "val", self._epoch_position)
            self._write_curves(trainer)
            self._write_weights(trainer, pl_module)
        self._write_confusion_matrix(trainer, pl_module, "val")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_curves(trainer)
        self._write_weights(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_confusion_matrix(trainer, pl_module, "test")
        self._write_weights(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"history": {key: list(points) for key, points in self.history.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {key: [tuple(point) for point in state_dict["history"].get(key, [])] for key in HISTORY_KEYS}

    # -- recording -----------------------------------------------------------

    def _record(self, trainer: pl.Trainer, split: str, position: float) -> None:
        for quantity in ("loss", "acc"):
            value = _metric_value(trainer.callback_metrics, f"{split}_{quantity}")
            if value is not None:
                self.history[f"{split}_{quantity}"].append((position, value))

    # -- writing -------------------------------------------------------------

    def _target(self, trainer: pl.Trainer, filename: str) -> Path | None:
        """Where to write `filename`; None on ranks other than zero."""
        if not trainer.is_global_zero:
            return None
        if self._plot_dir is None:
            raise RuntimeError("TrainingPlots wrote before Lightning called its setup()")
        self._plot_dir.mkdir(parents=True, exist_ok=True)
        return self._plot_dir / filename

    def _note_written(self, path: Path) -> None:
        if path not in self.written:
            self.written.append(path)

    def _write_curves(self, trainer: pl.Trainer) -> None:
        curves = {
            "loss.png": ("Loss", "cross-entropy loss", ("train_loss_step", "train_loss", "val_loss")),
            "accuracy.png": ("Accuracy", "accuracy", ("train_acc", "val_acc")),
        }
        styles = {
            "train_loss_step": dict(color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)"),
            "train_loss": dict(color="tab:blue", marker="o", label="train (epoch mean)"),
            "train_acc": dict(color="tab:blue", marker="o", label="train"),
            "val_loss": dict(color="tab:orange", marker="s", label="validation"),
            "val_acc": dict(color="tab:orange", marker="s", label="validation"),
        }
        for filename, (title, ylabel, keys) in curves.items():
            if not any(self.history[key] for key in keys):
                continue
            path = self._target(trainer, filename)
            if path is None:
                return
            figure = Figure(figsize=(7, 4.5))
            axes = figure.add_subplot()
            for key in keys:
                if self.history[key]:
                    positions, values = zip(*self.history[key])
                    axes.plot(positions, values, **styles[key])
            axes.set(title=title, xlabel="epoch", ylabel=ylabel)
            axes.grid(alpha=0.3)
            axes.legend()
            figure.tight_layout()
            _save(figure, path)
            self._note_written(path)

    def _write_confusion_matrix(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        matrices = getattr(pl_module, "confusion_matrices", None)
        if not isinstance(matrices, dict) or matrices.get(split) is None:
            return
        counts = torch.as_tensor(matrices[split]).detach().cpu()
        if counts.dim() != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
            raise ValueError(
                f"confusion_matrices[{split!r}] must be a non-empty square (true, predicted) count matrix, "
                f"got shape {tuple(counts.shape)}"
            )
        path = self._target(trainer, f"confusion_matrix_{split}.png")
        if path is None:
            return
        counts = counts.to(torch.int64).numpy()
        num_classes = counts.shape[0]
        names = getattr(pl_module, "class_names", None)
        if names is None or len(names) != num_classes:
            names = [str(index) for index in range(num_classes)]
        row_totals = counts.sum(axis=1, keepdims=True)
        recall = counts / np.maximum(row_totals, 1)
        total = counts.sum()
        accuracy = np.trace(counts) / total if total else float("nan")

        size = max(5.0, 0.55 * num_classes + 2.5)
        figure = Figure(figsize=(size + 1.0, size))
        axes = figure.add_subplot()
        image = axes.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0)
        colorbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
        colorbar.set_label("fraction of the true class (row-normalised)")
        font_size = 9 if num_classes <= 10 else max(5, 90 // num_classes)
        for row in range(num_classes):
            for column in range(num_classes):
                axes.text(
                    column, row, str(counts[row, column]), ha="center", va="center", fontsize=font_size,
                    color="white" if recall[row, column] > 0.5 else "black",
                )  # fmt: skip
        axes.set_xticks(range(num_classes), names, rotation=45, ha="right", rotation_mode="anchor")
        axes.set_yticks(range(num_classes), names)
        axes.set(xlabel="predicted class", ylabel="true class")
        axes.set_title(
            f"Confusion matrix ({split}): accuracy {accuracy:.1%} of {total}\n"
            "cells: counts; colour: row-normalised (recall)"
        )
        figure.tight_layout()
        _save(figure, path)
        self._note_written(path)

    def _write_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        first_layer_weights = getattr(pl_module, "first_layer_weights", None)
        if not callable(first_layer_weights):
            return
        path = self._target(trainer, "first_layer_weights.png")
        if path is None:
            return
        weights = first_layer_weights()
        mosaic, mapping = weights_mosaic(weights, self.max_filters)
        shown = min(weights.shape[0], self.max_filters)
        figure = Figure(figsize=(6, 6.6))
        axes = figure.add_subplot()
        axes.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes.set_axis_off()
        channels, height, width = weights.shape[1:]
        axes.set_title(
            f"First-layer weights: {shown} of {weights.shape[0]} filters ({channels}x{height}x{width})\n"
            f"each min-max scaled to [0, 1]; {mapping}"
        )
        figure.tight_layout()
        _save(figure, path)
        self._note_written(path)
