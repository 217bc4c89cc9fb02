"""A callback that stops training with a clear error when the loss becomes NaN or infinite."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message says where and what to try."""


class FiniteLossCheck(Callback):
    """Raise `NonFiniteLossError` as soon as a training loss is NaN or infinite.

    The check runs before the backward pass, so the diverged step never reaches
    the weights or the optimizer state, and the checkpoints written so far stay
    as they were. The message names the epoch, the global step and the batch,
    the loss value and the last checkpoint, and suggests a lower learning rate.

    Under DDP the processes agree on the outcome (one all-reduce of a flag per
    step), so every process stops at the same step instead of the others
    waiting forever in the next gradient all-reduce. Reading the flag
    synchronises with the device once per step.
    """

    def __init__(self) -> None:
        self._batch_idx = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite_here = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(finite_here, all=True):
            return
        raise NonFiniteLossError(self._message(trainer, loss, finite_here))

    def _message(self, trainer: pl.Trainer, loss: torch.Tensor, finite_here: bool) -> str:
        value = "in another process" if finite_here else f"{loss.detach().float().sum().item()}"
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", ""
        )
        saved = f" The last checkpoint written is {checkpoint}." if checkpoint else " No checkpoint was written yet."
        return (
            f"training stopped: the training loss is not finite ({value}) at epoch {trainer.current_epoch}, "
            f"global step {trainer.global_step}, batch {self._batch_idx} of the epoch; this step was not applied. "
            "The model diverged: lower the learning rate (e.g. --model.optimizer.init_args.lr), or clip gradients "
            "(--trainer.gradient_clip_val), and check the input data for NaN or infinite values." + saved
        )
