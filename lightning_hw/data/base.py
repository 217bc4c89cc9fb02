"""The base of the image-classification DataModules: splits held in memory as uint8 tensors
(`InMemoryImageDataset`, preprocessed a batch at a time) and `ImageClassificationDataModule`
with its statistics, dataloaders, prediction folders and class-count reports.

The pieces it builds on have modules of their own: errors (`errors`), image files
(`images`), normalisation (`preprocessing`), splits and samplers (`splits`) and
augmentation (`augmentation`)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_hw.data.augmentation import TensorAugment
from lightning_hw.data.images import PIXEL_SCALE_8BIT, read_image_folder
from lightning_hw.data.preprocessing import (
    NORMALIZE_MODES,
    BatchPreprocessor,
    Normalization,
    normalization_shape,
    normalization_stats,
)
from lightning_hw.data.splits import EpochSeededSampler, seeded_split
from lightning_hw.errors import CommandError


class InMemoryImageDataset(Dataset):
    """Labelled uint8 images (N, C, H, W) held in memory, preprocessed a batch at a time.

    DataLoader fetches whole batches through `__getitems__`, so scaling,
    augmentation and normalisation run as vectorised torch ops per batch.
    Items are (x float32, y int64).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        preprocessor: BatchPreprocessor,
        augment: TensorAugment | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {images.shape[0]} images")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.preprocessor = preprocessor
        self.augment = augment

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        x = self.preprocessor(self.images[index], self.augment)
        return list(zip(x.unbind(0), self.labels[index].unbind(0)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]



class ImageClassificationDataModule(pl.LightningDataModule):
    """Base of the image-classification DataModules: splits held in memory as uint8 tensors.

    Subclasses set `num_classes`, `class_names`, `input_shape` and
    `pixel_scale` in `__init__` and implement `_load_fit_splits` (train, val)
    and `_load_test_split`. This class computes normalisation statistics on
    the train split and builds the dataloaders, the class weights and the
    class-distribution table.

    Prediction reads the test split, or with `predict_dir` every image file
    under that folder (`read_image_folder`), converted to the data set's
    channels (gray or RGB) and size and normalised with the train split's
    statistics. Those statistics are this DataModule's `state_dict`, which
    Lightning keeps in every checkpoint, so predicting from a checkpoint needs
    no training data.
    """

    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, ...]
    # A stored image's (C, H, W), where input_shape is something else (flattened samples).
    image_shape: tuple[int, int, int] | None = None
    pixel_scale: float = 1.0 / 255.0

    def __init__(
        self,
        data_dir: str | Path = "./data",
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        val_size: int | float = 0.1,
        seed: int = 0,
        normalize: str = "none",
        flatten: bool = False,
        augment: TensorAugment | None = None,
        balanced_sampler: bool = False,
        predict_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.val_size = val_size
        self.seed = seed
        self.normalize = normalize
        self.flatten = flatten
        self.train_augment = augment
        self.balanced_sampler = balanced_sampler
        self.predict_dir = None if predict_dir is None else Path(predict_dir)
        self.train_dataset: InMemoryImageDataset | None = None
        self.val_dataset: InMemoryImageDataset | None = None
        self.test_dataset: InMemoryImageDataset | None = None
        self._preprocessor: BatchPreprocessor | None = None
        # From a checkpoint (load_state_dict): the train split's (mean, std).
        self._restored_statistics: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
        # predict_dir's readable images, their paths relative to it, and the skipped files with the reason.
        self._predict_images: torch.Tensor | None = None
        self.predict_files: list[str] = []
        self.predict_skipped: list[tuple[str, str]] = []

    # -- to implement -------------------------------------------------------

    def _load_fit_splits(
        self,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Return ((train_images, train_labels), (val_images, val_labels)), images uint8 (N, C, H, W)."""
        raise NotImplementedError

    def _load_test_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (test_images, test_labels), images uint8 (N, C, H, W)."""
        raise NotImplementedError

    def _hold_out_val(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Split one labelled pool into (train, val), val a seeded `val_size` part of it."""
        train_index, val_index = seeded_split(len(labels), [self.val_size], self.seed)
        return (images[train_index], labels[train_index]), (images[val_index], labels[val_index])

    def prepare_files(self) -> None:
        """Download or check the data set's files (`prepare_data` calls this); nothing by default."""

    # -- Lightning hooks ----------------------------------------------------

    def prepare_data(self) -> None:
        """`prepare_files`, except when predicting `predict_dir`, which needs no data set files."""
        if self.predict_dir is not None and self.trainer is not None and self.trainer.state.fn == "predict":
            return
        self.prepare_files()

    def setup(self, stage: str | None = None) -> None:
        """Load the splits `stage` needs (all for None); splits already loaded are kept.

        Predicting with `predict_dir` reads that folder and no split.
        """
        if stage == "predict" and self.predict_dir is not None:
            self._setup_predict_folder()
            return
        needs_fit = stage in (None, "fit", "validate")
        needs_test = stage in (None, "test", "predict")
        # Test-time normalisation uses statistics of the train split.
        if needs_fit or (needs_test and self.normalize != "none"):
            self._setup_fit()
        if needs_test:
            self._setup_test()

    def _setup_fit(self) -> None:
        if self.train_dataset is not None:
            return
        (train_images, train_labels), (val_images, val_labels) = self._load_fit_splits()
        mean, std = normalization_stats(train_images, self.pixel_scale, self.normalize)
        self._preprocessor = BatchPreprocessor(self.pixel_scale, Normalization(mean, std, self.flatten))
        self.train_dataset = InMemoryImageDataset(
            train_images, train_labels, self._preprocessor, self.train_augment
        )
        self.val_dataset = InMemoryImageDataset(val_images, val_labels, self._preprocessor)

    def _setup_test(self) -> None:
        if self.test_dataset is not None:
            return
        test_images, test_labels = self._load_test_split()
        if self._preprocessor is None:
            self._preprocessor = BatchPreprocessor(self.pixel_scale, Normalization(flatten=self.flatten))
        self.test_dataset = InMemoryImageDataset(test_images, test_labels, self._preprocessor)

    @property
    def image_file_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) at which image files are read for prediction, and the images an
        exported model takes: one stored image's shape (input_shape may be flattened)."""
        channels, height, width = self.image_shape or self.input_shape
        return channels, height, width

    def image_file_normalization(self) -> Normalization:
        """What turns image files' pixels, scaled to [0, 1], into this model's input, as the train split
        was turned: its statistics (restored from a checkpoint, or computed by `setup("fit")`) and the
        flattening. `predict` applies it to every image file; `export` puts it into the ONNX graph.

        Raises a CommandError when the data are normalised and no statistics were loaded.
        """
        if self.normalize == "none":
            mean = std = None
        elif self._restored_statistics is not None:
            mean, std = self._restored_statistics
        elif self._preprocessor is not None:
            mean, std = self._preprocessor.mean, self._preprocessor.std
        else:
            raise CommandError(
                f"the model's input (normalize={self.normalize!r}) needs the train split's statistics, and "
                "the checkpoint carries none",
                None,
                "pass a checkpoint written by fit (--ckpt_path), whose DataModule state carries them",
            )
        return Normalization(mean, std, self.flatten)

    def _setup_predict_folder(self) -> None:
        if self._predict_images is not None:
            return
        channels, height, width = self.image_file_shape
        self._predict_images, self.predict_files, self.predict_skipped = read_image_folder(
            self.predict_dir, (height, width), channels
        )

    def _predict_folder_dataset(self) -> InMemoryImageDataset:
        """predict_dir's images, preprocessed as the train split (built after a checkpoint is restored)."""
        assert self._predict_images is not None
        # Image files hold 0..255 (load_image), whatever range the data set's own files store.
        preprocessor = BatchPreprocessor(PIXEL_SCALE_8BIT, self.image_file_normalization())
        unlabelled = torch.full((len(self._predict_images),), -1, dtype=torch.int64)
        return InMemoryImageDataset(self._predict_images, unlabelled, preprocessor)

    # -- checkpoint state ---------------------------------------------------

    def state_dict(self) -> dict:
        """The train split's normalisation statistics (what prediction needs), once computed."""
        if self.normalize == "none" or self._preprocessor is None or self._preprocessor.mean is None:
            return {}
        return {"normalize": self.normalize, "mean": self._preprocessor.mean, "std": self._preprocessor.std}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if state_dict.get("normalize") != self.normalize:
            raise ValueError(
                f"the checkpoint's data were normalised with normalize={state_dict.get('normalize')!r}, this "
                f"DataModule uses {self.normalize!r}: use the run's own config.yaml"
            )
        image_shape = self.image_file_shape
        expected = normalization_shape(self.normalize, image_shape)
        mean, std = state_dict.get("mean"), state_dict.get("std")
        for name, value in (("mean", mean), ("std", std)):
            if value is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != expected):
                raise ValueError(
                    f"the checkpoint's normalisation {name} has shape {getattr(value, 'shape', type(value))}, "
                    f"expected {expected} for images {tuple(image_shape)}: use the run's own config.yaml"
                )
        self._restored_statistics = (mean, std)

    def _loader(self, dataset: InMemoryImageDataset | None, name: str, train: bool = False) -> DataLoader:
        if dataset is None:
            stage = "fit" if name in ("train", "val") else "test"
            raise RuntimeError(f"the {name} split is not loaded: call setup({stage!r}) first")
        extra: dict = {}
        if self.num_workers > 0:
            extra["persistent_workers"] = self.persistent_workers
        if train:
            weights = self._balanced_sample_weights() if self.balanced_sampler else None
            trainer = self.trainer  # set while a Trainer uses this DataModule
            replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            extra["sampler"] = EpochSeededSampler(len(dataset), self.seed, weights, replicas, rank)
            # Seeds the workers' random streams (augmentation) reproducibly.
            extra["generator"] = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test")

    def predict_dataloader(self) -> DataLoader:
        if self.predict_dir is not None:
            if self._predict_images is None:
                raise RuntimeError("predict_dir is not read: call setup('predict') first")
            return self._loader(self._predict_folder_dataset(), "predict")
        return self._loader(self.test_dataset, "test")

    # -- class balance ------------------------------------------------------

    def class_counts(self) -> dict[str, list[int]]:
        """Samples per class in each split: {"train": [...], "val": [...], "test": [...]}.

        Loads the splits that are not loaded yet.
        """
        self.setup(None)
        counts = {}
        for split, dataset in (("train", self.train_dataset), ("val", self.val_dataset), ("test", self.test_dataset)):
            assert dataset is not None
            counts[split] = torch.bincount(dataset.labels, minlength=self.num_classes).tolist()
        return counts

    def class_distribution_table(self) -> str:
        """The class counts per split as a printable text table with a total row."""
        counts = self.class_counts()
        splits = list(counts)
        name_width = max(len("class"), len("total"), *(len(n) for n in self.class_names))
        widths = [max(len(s), len(str(sum(counts[s])))) for s in splits]
        lines = [
            "  ".join([f"{'class':<{name_width}}"] + [f"{s:>{w}}" for s, w in zip(splits, widths)])
        ]
        for label, name in enumerate(self.class_names):
            cells = [f"{counts[s][label]:>{w}}" for s, w in zip(splits, widths)]
            lines.append("  ".join([f"{name:<{name_width}}"] + cells))
        totals = [f"{sum(counts[s]):>{w}}" for s, w in zip(splits, widths)]
        lines.append("  ".join([f"{'total':<{name_width}}"] + totals))
        return "\n".join(lines)

    @property
    def class_weights(self) -> torch.Tensor:
        """Inverse-frequency weights over the train split, n / (num_classes * n_c), for a weighted loss.

        Classes absent from the train split get weight 0.
        """
        self.setup("fit")
        assert self.train_dataset is not None
        counts = torch.bincount(self.train_dataset.labels, minlength=self.num_classes).to(torch.float32)
        weights = torch.zeros_like(counts)
        present = counts > 0
        weights[present] = counts.sum() / (self.num_classes * counts[present])
        return weights

    def _balanced_sample_weights(self) -> torch.Tensor:
        assert self.train_dataset is not None
        counts = torch.bincount(self.train_dataset.labels, minlength=self.num_classes).to(torch.float64)
        return (1.0 / counts)[self.train_dataset.labels]
