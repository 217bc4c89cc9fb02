"""ModelCheckpoint whose last.ckpt always holds the newest epoch, whatever the monitored best."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn


class LastEpochCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` (same options) that, with `save_last`, writes last.ckpt after every epoch.

    Lightning (2.6) writes last.ckpt only when it also writes a top-k checkpoint, so with a
    monitored metric last.ckpt held the best epoch, and `--ckpt_path last` resumed from there,
    throwing the later epochs away; with `save_last="link"` last.ckpt linked to the best file.
    Here, wherever Lightning checks for a checkpoint (the end of a training epoch, or of its
    validation) last.ckpt is brought up to date: linked to the top-k file just written
    (`save_last="link"`), or written in full.

    An interrupted epoch (Ctrl-C, SIGTERM) is not saved: the data loaders cannot resume in the
    middle of an epoch (Lightning warns that such a resume gives unreliable results), so
    last.ckpt stays at the end of the last whole epoch, and resuming repeats the interrupted one.
    """

    _last_step_of_last: int | None = None  # the global step last.ckpt was written at

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._bring_last_up_to_date(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._bring_last_up_to_date(trainer)

    def _bring_last_up_to_date(self, trainer: pl.Trainer) -> None:
        if (
            not self.save_last
            or trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or self._last_step_of_last == trainer.global_step
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        # Lightning links last.ckpt to the newest top-k file it wrote, however old: only link to one of this step.
        if self._last_global_step_saved != trainer.global_step and hasattr(self, "_last_checkpoint_saved"):
            self._last_checkpoint_saved = ""
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step_of_last = trainer.global_step
