"""A callback that gathers `predict_step` outputs from every process, in data set order."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.strategies import Strategy


class PredictionCollector(BasePredictionWriter):
    """Collect the predictions of a `trainer.predict` run from all processes.

    Under DDP each process predicts only its share of the data set. At the end
    of the predict epoch the shares are gathered onto every process and put
    back in the order of the data set's indices, each index once (a sampler
    that pads or repeats samples adds nothing). Afterwards `indices` (int64,
    ascending) and `predictions` (one row per index, as predict_step returned
    them, on the CPU) are set on every process; before, both are None.

    predict_step must return one tensor whose first dimension is the batch, and
    there must be one predict dataloader (the indices of two would collide).
    """

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.indices: torch.Tensor | None = None
        self.predictions: torch.Tensor | None = None
        self._batch_indices: list[torch.Tensor] = []
        self._batch_predictions: list[torch.Tensor] = []

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.indices = self.predictions = None
        self._batch_indices, self._batch_predictions = [], []

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: torch.Tensor,
        batch_indices: Sequence[int] | None,
        batch,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if dataloader_idx != 0:
            raise ValueError("PredictionCollector gathers the predictions of one predict dataloader, got several")
        if not isinstance(prediction, torch.Tensor) or prediction.dim() == 0:
            raise TypeError(f"predict_step must return a tensor with a batch dimension, got {type(prediction).__name__}")
        if batch_indices is None or len(batch_indices) != prediction.shape[0]:
            raise RuntimeError(
                f"cannot tell which samples batch {batch_idx} holds: the predict dataloader must be a "
                "torch DataLoader with a batch sampler, so Lightning can record the sample indices"
            )
        self._batch_indices.append(torch.as_tensor(list(batch_indices), dtype=torch.int64))
        self._batch_predictions.append(prediction.detach())

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        if self._batch_predictions:
            predictions = torch.cat(self._batch_predictions).to(device)
            indices = torch.cat(self._batch_indices).to(device)
        else:  # this process got no samples; the others may have some
            predictions = torch.empty(0, device=device)
            indices = torch.empty(0, dtype=torch.int64, device=device)
        indices = gather_rows(trainer.strategy, indices, trainer.world_size).cpu()
        predictions = gather_rows(trainer.strategy, predictions, trainer.world_size).cpu()
        unique, first = first_occurrences(indices)
        self.indices, self.predictions = unique, predictions[first]
        self._batch_indices, self._batch_predictions = [], []


def gather_rows(strategy: Strategy, rows: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate `rows` (n_rank, ...) of every process, rank 0's first; the n_rank may differ.

    Each process pads its rows to the longest count before the all-gather and
    the padding is cut off afterwards. A process with no rows may pass an
    empty tensor of any shape: its dtype and trailing shape come from the
    others. Must be called on every process.
    """
    if world_size == 1:
        return rows
    counts = strategy.all_gather(torch.tensor(rows.shape[0], device=rows.device)).reshape(-1).tolist()
    # The row shape and dtype of the first process that has rows, for processes that have none.
    donor = next(rank for rank, count in enumerate(counts) if count > 0) if any(counts) else 0
    template = strategy.broadcast((tuple(rows.shape[1:]), rows.dtype), src=donor)
    padded = torch.zeros((max(counts), *template[0]), dtype=template[1], device=rows.device)
    padded[: rows.shape[0]] = rows.reshape(rows.shape[0], *template[0]).to(template[1])
    gathered = strategy.all_gather(padded)
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])


def first_occurrences(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of `indices` in ascending order, and for each the position of its first occurrence."""
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    positions = torch.arange(len(indices), dtype=torch.int64)
    first = torch.full((len(unique),), len(indices), dtype=torch.int64).scatter_reduce(
        0, inverse, positions, reduce="amin"
    )
    return unique, first
