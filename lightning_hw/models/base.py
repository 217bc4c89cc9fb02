"""The shared LightningModule of the reports' classifiers: loss, metrics,
logging, prediction and the optimizer/scheduler wiring.

Subclasses build their layers and implement `forward` (logits) and
`first_layer_weights`; they may add a penalty to the loss (`regularization`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

EVAL_STAGES = ("val", "test")


class ImageClassifier(pl.LightningModule):
    """Base of the reports' models: softmax cross-entropy on class logits.

    Logged per step and per epoch: `train_loss`, `train_acc`; per epoch:
    `val_loss`, `val_acc`, `test_loss`, `test_acc` and per-class accuracies
    (`val_acc_class/<name>`, `test_acc_class/<name>`). After each val/test
    epoch the confusion matrix (rows: true class, columns: predicted) is in
    `confusion_matrices[stage]` for the plots callback. `predict_step` returns
    class probabilities (softmax of the logits, float32, (N, num_classes)).

    Args:
        num_classes: number of classes (linked from the DataModule by the CLI).
        input_shape: shape of one sample, e.g. (3, 32, 32) (linked from the DataModule).
        class_names: names for the plots and per-class metrics (linked from the DataModule).
        optimizer: builds the optimizer from the parameters (CLI: `--model.optimizer`;
            default Adam with its default learning rate 1e-3).
        lr_scheduler: builds the scheduler from the optimizer (CLI: `--model.lr_scheduler`);
            stepped once per epoch.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int],
        class_names: Sequence[str] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if len(input_shape) == 0 or any(int(size) < 1 for size in input_shape):
            raise ValueError(f"input_shape must be a non-empty shape of positive sizes, got {input_shape!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        # The optimizer and scheduler factories are code, not hyper-parameters:
        # keeping them out of the checkpoint lets it load with weights_only=True.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(size) for size in input_shape)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.label_smoothing = label_smoothing
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.eval_accuracy = nn.ModuleDict({stage: MulticlassAccuracy(num_classes, average="micro") for stage in EVAL_STAGES})
        self.eval_class_accuracy = nn.ModuleDict(
            {stage: MulticlassAccuracy(num_classes, average="none") for stage in EVAL_STAGES}
        )
        self.eval_confusion = nn.ModuleDict({stage: MulticlassConfusionMatrix(num_classes) for stage in EVAL_STAGES})
        self.confusion_matrices: dict[str, torch.Tensor] = {}

    # -- to implement -------------------------------------------------------

    def first_layer_weights(self) -> torch.Tensor:
        """The first layer's weights as images (K, C, H, W), detached, on the CPU."""
        raise NotImplementedError

    def regularization(self) -> torch.Tensor | None:
        """A penalty added to the data loss (None: no penalty)."""
        return None

    # -- steps --------------------------------------------------------------

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, data loss): cross-entropy plus the model's regularization."""
        data_loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        penalty = self.regularization()
        return (data_loss if penalty is None else data_loss + penalty), data_loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss, data_loss = self._loss(logits, labels)
        self.train_accuracy(logits, labels)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train_acc", self.train_accuracy, on_step=True, on_epoch=True, prog_bar=True)
        if loss is not data_loss:
            self.log("train_data_loss", data_loss, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        images, labels = batch
        logits = self(images)
        loss, _ = self._loss(logits, labels)
        self.eval_accuracy[stage](logits, labels)
        self.eval_class_accuracy[stage].update(logits, labels)
        self.eval_confusion[stage].update(logits, labels)
        self.log(f"{stage}_loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{stage}_acc", self.eval_accuracy[stage], prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.probabilities(images)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (softmax of the logits, float32, (N, num_classes)): what `predict`
        writes and what a model written by `python -m lightning_hw export` returns."""
        return torch.softmax(self(images).float(), dim=1)

    def _eval_epoch_end(self, stage: str) -> None:
        per_class = self.eval_class_accuracy[stage].compute()
        self.log_dict({f"{stage}_acc_class/{name}": acc for name, acc in zip(self.class_names, per_class)})
        self.eval_class_accuracy[stage].reset()
        self.confusion_matrices[stage] = self.eval_confusion[stage].compute().cpu()
        self.eval_confusion[stage].reset()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # -- export -------------------------------------------------------------

    def to_onnx(self, file_path: str | Path | None = None, input_sample: Any = None, **kwargs: Any):
        """LightningModule.to_onnx (torch.onnx.export of `forward`: input as the model takes it,
        logits out) with lightning_hw's ops translated to standard ONNX operators
        (`lightning_hw.onnx_ops.CUSTOM_TRANSLATION_TABLE`, added to any `custom_translation_table`
        given), by the torch.export-based exporter, in eval mode (dropout off, batch-norm running
        statistics). Without `input_sample` (and `example_input_array`) a random batch of 2 samples
        of `input_shape` is traced and the batch size is a dynamic axis. `kwargs` go to
        torch.onnx.export. Returns its torch.onnx.ONNXProgram. Needs `pip install 'lightning_hw[export]'`.

        `python -m lightning_hw export` writes a file for deployment instead: images in [0, 1] in,
        the data's normalisation inside, class probabilities out.
        """
        from lightning_hw import onnx_ops

        if input_sample is None and self.example_input_array is None:
            input_sample = (torch.rand(2, *self.input_shape, device=self.device),)
            if "dynamic_axes" not in kwargs:
                kwargs.setdefault("dynamic_shapes", onnx_ops.batch_dynamic_shapes())
        options = onnx_ops.export_options(**kwargs)
        training = self.training
        self.eval()
        try:
            return super().to_onnx(file_path, input_sample, **options)
        finally:
            self.train(training)

    # -- optimisation -------------------------------------------------------

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
