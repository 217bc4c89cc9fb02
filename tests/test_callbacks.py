"""TrainingPlots: real Trainer runs on random tensors write valid PNGs, record the
right values at the right hooks, and survive modules that lack parts of the interface."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_hw.callbacks import TrainingPlots
from lightning_hw.callbacks.plots import weights_mosaic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASS_NAMES = ["Angry", "Disgust", "Fear", "Happy"]
IMAGE_SHAPE = (3, 8, 8)
BATCH_SIZE = 8


class TinyClassifier(pl.LightningModule):
    """A linear classifier implementing the module side of the plots interface."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(int(np.prod(IMAGE_SHAPE)), len(CLASS_NAMES))
        self.class_names = list(CLASS_NAMES)
        self.confusion_matrices: dict[str, torch.Tensor] = {}
        self.step_losses: list[float] = []
        self._running_counts: torch.Tensor | None = None

    def first_layer_weights(self) -> torch.Tensor:
        return self.linear.weight.detach().cpu().view(-1, *IMAGE_SHAPE)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.flatten(1))

    def _loss_and_accuracy(self, batch):
        images, labels = batch
        logits = self(images)
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean(), logits, labels

    def training_step(self, batch, batch_idx):
        loss, accuracy, _, _ = self._loss_and_accuracy(batch)
        self.step_losses.append(float(loss))
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", accuracy, on_step=True, on_epoch=True)
        return loss

    def _evaluation_step(self, batch, split: str) -> None:
        loss, accuracy, logits, labels = self._loss_and_accuracy(batch)
        self.log(f"{split}_loss", loss)
        self.log(f"{split}_acc", accuracy)
        classes = len(CLASS_NAMES)
        counts = torch.bincount(labels * classes + logits.argmax(1), minlength=classes**2).view(classes, classes)
        self._running_counts = counts if self._running_counts is None else self._running_counts + counts

    def _publish_counts(self, split: str) -> None:
        # Published only at epoch end, as the real modules do.
        self.confusion_matrices[split] = self._running_counts
        self._running_counts = None

    def validation_step(self, batch, batch_idx):
        self._evaluation_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._publish_counts("val")

    def test_step(self, batch, batch_idx):
        self._evaluation_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._publish_counts("test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BareClassifier(pl.LightningModule):
    """Only a training step: no logged metrics, class names, confusion matrices or weights."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(int(np.prod(IMAGE_SHAPE)), len(CLASS_NAMES))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return {"loss": F.cross_entropy(self.linear(images.flatten(1)), labels)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def random_loader(num_samples: int = 4 * BATCH_SIZE) -> DataLoader:
    images = torch.randn(num_samples, *IMAGE_SHAPE)
    labels = torch.randint(0, len(CLASS_NAMES), (num_samples,))
    return DataLoader(TensorDataset(images, labels), batch_size=BATCH_SIZE)


def make_trainer(root: Path, plots: TrainingPlots, **overrides) -> pl.Trainer:
    options = dict(
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=2,
        limit_test_batches=2,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        default_root_dir=root,
        logger=CSVLogger(root),
        callbacks=[plots],
    )
    options.update(overrides)
    return pl.Trainer(**options)


def assert_valid_pngs(paths: list[Path], expected_names: set[str]) -> None:
    assert {path.name for path in paths} == expected_names
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
            assert image.format == "PNG"
            assert 300 <= width <= 2000 and 300 <= height <= 2000, (path, image.size)


@pytest.fixture(autouse=True)
def quiet_lightning():
    # Lightning's advice about tiny loaders and worker counts is noise for these runs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def test_fit_then_test_writes_every_plot_in_the_log_dir(tmp_path):
    plots = TrainingPlots(max_filters=3)
    module = TinyClassifier()
    trainer = make_trainer(tmp_path, plots, accumulate_grad_batches=2)
    trainer.fit(module, random_loader(), random_loader())
    plot_dir = Path(trainer.log_dir) / "plots"
    assert plot_dir.parent != tmp_path  # the CSVLogger's version folder, not the root
    fit_names = {"loss.png", "accuracy.png", "confusion_matrix_val.png", "first_layer_weights.png"}
    assert_valid_pngs(plots.written, fit_names)
    assert all(path.parent == plot_dir for path in plots.written)
    assert not list(plot_dir.glob("*.tmp"))

    trainer.test(module, random_loader())
    assert_valid_pngs(plots.written, fit_names | {"confusion_matrix_test.png"})

    # Per-step losses are the ones training_step computed, although Lightning
    # hands on the loss divided by accumulate_grad_batches.
    history = plots.history
    positions, losses = zip(*history["train_loss_step"])
    np.testing.assert_allclose(losses, module.step_losses, rtol=1e-6)
    np.testing.assert_allclose(positions, [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0])
    # One point per epoch at the epoch's end; the sanity-check validation is not one.
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert [position for position, _ in history[key]] == [1.0, 2.0], key
    epoch_losses = [value for _, value in history["train_loss"]]
    np.testing.assert_allclose(epoch_losses, np.reshape(module.step_losses, (2, 4)).mean(axis=1), rtol=1e-5)
    assert not (tmp_path / "plots").exists()


def test_validation_mid_epoch_is_placed_within_the_epoch(tmp_path):
    plots = TrainingPlots()
    trainer = make_trainer(tmp_path, plots, max_epochs=1, val_check_interval=2, num_sanity_val_steps=0)
    trainer.fit(TinyClassifier(), random_loader(), random_loader())
    assert [position for position, _ in plots.history["val_loss"]] == [0.5, 1.0]


def test_test_only_run_writes_the_test_confusion_matrix_and_weights(tmp_path):
    plots = TrainingPlots()
    make_trainer(tmp_path, plots).test(TinyClassifier(), random_loader())
    assert_valid_pngs(plots.written, {"confusion_matrix_test.png", "first_layer_weights.png"})


def test_validate_reads_the_confusion_matrix_after_the_module_published_it(tmp_path):
    # The module publishes its counts only in on_validation_epoch_end, so the
    # plot exists only if the callback reads them later.
    plots = TrainingPlots()
    module = TinyClassifier()
    make_trainer(tmp_path, plots).validate(module, random_loader())
    assert_valid_pngs(plots.written, {"confusion_matrix_val.png"})
    assert not plots.history["val_loss"]  # validate is not an epoch of training


def test_module_without_the_plot_interface_gets_only_the_loss_curve(tmp_path):
    plots = TrainingPlots()
    make_trainer(tmp_path, plots, limit_val_batches=0).fit(BareClassifier(), random_loader())
    assert_valid_pngs(plots.written, {"loss.png"})
    assert len(plots.history["train_loss_step"]) == 8


def test_fast_dev_run_writes_into_the_default_root_dir(tmp_path):
    plots = TrainingPlots(dirname="figures")
    trainer = make_trainer(tmp_path, plots, fast_dev_run=True)
    trainer.fit(TinyClassifier(), random_loader(), random_loader())
    assert trainer.log_dir is None
    assert all(path.parent == tmp_path / "figures" for path in plots.written)
    assert_valid_pngs(
        plots.written, {"loss.png", "accuracy.png", "confusion_matrix_val.png", "first_layer_weights.png"}
    )


def test_history_survives_a_checkpoint_round_trip():
    plots = TrainingPlots()
    plots.history["val_loss"].append((1.0, 0.5))
    restored = TrainingPlots()
    restored.load_state_dict(plots.state_dict())
    assert restored.history == plots.history


@pytest.mark.parametrize(
    ("channels", "expected_shape", "mapping"),
    [(3, (1 + 3 * 5, 1 + 3 * 5, 3), "RGB"), (1, (16, 16), "grayscale"), (4, (16, 16), "mean over 4 channels")],
)
def test_weights_mosaic_scales_each_filter_to_the_unit_range(channels, expected_shape, mapping):
    weights = torch.randn(12, channels, 4, 4) * torch.logspace(-3, 3, 12).view(-1, 1, 1, 1)
    mosaic, described = weights_mosaic(weights, max_filters=9)  # 9 of 12: a 3x3 grid
    assert mosaic.shape == expected_shape and described == mapping
    tiles = [
        mosaic[1 + 5 * row : 5 * row + 5, 1 + 5 * column : 5 * column + 5] for row in range(3) for column in range(3)
    ]
    for index, tile in enumerate(tiles):
        assert tile.min() == pytest.approx(0.0) and tile.max() == pytest.approx(1.0), index
    expected = weights[:9].double()
    expected = expected if channels in (1, 3) else expected.mean(dim=1, keepdim=True)
    first = expected[0].permute(1, 2, 0).squeeze(-1)
    np.testing.assert_allclose(tiles[0], ((first - first.min()) / (first.max() - first.min())).numpy(), rtol=1e-12)


def test_bad_arguments_and_module_outputs_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="dirname"):
        TrainingPlots(dirname="")
    with pytest.raises(ValueError, match="max_filters"):
        TrainingPlots(max_filters=0)
    with pytest.raises(ValueError, match=r"\(K, C, H, W\)"):
        weights_mosaic(torch.randn(4, 32, 32), max_filters=4)
    module = TinyClassifier()
    module.on_test_epoch_end = lambda: module.confusion_matrices.update(test=torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="square"):
        make_trainer(tmp_path, TrainingPlots()).test(module, random_loader())
