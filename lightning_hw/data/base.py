"""Shared pieces of the DataModules: in-memory image datasets, seeded splits,
batch preprocessing (scaling, tensor augmentation, normalisation) and the
common DataModule base class with its dataloaders and class-count reports."""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_hw.errors import CommandError

NORMALIZE_MODES = ("none", "mean_image", "per_channel")
# The image files read from folders (training splits and prediction).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataFormatError(ValueError):
    """A data file exists but its content is not what the data set format promises."""


class DataNotFoundError(FileNotFoundError):
    """A data file or folder is missing; the message says where to get it and where to put it."""


# ---------------------------------------------------------------------------
# Splits


def resolve_split_size(size: int | float, total: int, name: str) -> int:
    """Turn a count (int) or a fraction in [0, 1) (float) into a number of samples."""
    if isinstance(size, bool):
        raise ValueError(f"{name} must be a count or a fraction, got {size!r}")
    if isinstance(size, float):
        if not 0.0 <= size < 1.0:
            raise ValueError(f"{name} as a fraction must lie in [0, 1), got {size}")
        count = int(round(size * total))
    else:
        count = int(size)
    if not 0 <= count < total:
        raise ValueError(f"{name}={size!r} leaves no training samples out of {total}")
    return count


def seeded_split(total: int, sizes: Sequence[int | float], seed: int) -> list[torch.Tensor]:
    """Split range(total) at random (seeded) into [rest, part_1, part_2, ...].

    `sizes` gives the size of each part after the first (counts or fractions of
    `total`). Each returned index tensor is sorted, so the order of samples in a
    split follows the order of the source files.
    """
    counts = [resolve_split_size(size, total, "split size") for size in sizes]
    if sum(counts) >= total:
        raise ValueError(f"split sizes {list(sizes)} leave no training samples out of {total}")
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(total, generator=generator)
    parts = []
    start = total - sum(counts)
    parts.append(permutation[:start].sort().values)
    for count in counts:
        parts.append(permutation[start : start + count].sort().values)
        start += count
    return parts


class EpochSeededSampler(DistributedSampler):
    """A fresh random order of the samples each epoch, drawn from (seed, epoch) alone, and this
    process's share of it.

    Without `weights` each epoch's order is a permutation of range(size); with
    `weights` (one per sample) `size` indices are drawn with replacement in
    proportion to them. Lightning calls `set_epoch` before every training epoch,
    also after resuming from a checkpoint, so epoch k sees the same order whether
    or not the run was interrupted (a generator carried across epochs would
    restart at epoch 0's order). Without `set_epoch` calls (a plain loop over the
    DataLoader) each pass moves on to the next epoch.

    With `num_replicas` processes, process `rank` takes every num_replicas-th
    sample of the order (padded by repeating its start, as DistributedSampler
    does), so the processes' batches together are the batches of one process
    with num_replicas times the batch size. Being a DistributedSampler, Lightning
    keeps it instead of wrapping it in its own, which would shuffle again.
    """

    def __init__(
        self, size: int, seed: int, weights: torch.Tensor | None = None, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        if weights is not None and weights.shape != (size,):
            raise ValueError(f"weights must have shape ({size},), got {tuple(weights.shape)}")
        self.size = size
        self.weights = weights

    def __iter__(self):
        # SeedSequence mixes (seed, epoch) so that no two pairs share a stream (seed + epoch would).
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()
        order += order[: self.total_size - len(order)]
        self.epoch += 1
        return iter(order[self.rank : self.total_size : self.num_replicas])


# ---------------------------------------------------------------------------
# Batch preprocessing


class TensorAugment:
    """Random augmentation of a float batch (N, C, H, W) with torch ops.

    Steps (each only when enabled): random crop after zero padding by
    `crop_padding` pixels, horizontal flip with probability 1/2, and a random
    affine warp combining a rotation in [-max_rotation_deg, max_rotation_deg]
    with a zoom factor drawn from `zoom_range`. Randomness comes from torch's
    global generator (seeded by Lightning's seed_everything and per worker).
    """

    def __init__(
        self,
        crop_padding: int = 0,
        horizontal_flip: bool = False,
        max_rotation_deg: float = 0.0,
        zoom_range: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        self.crop_padding = int(crop_padding)
        self.horizontal_flip = bool(horizontal_flip)
        self.max_rotation_deg = float(max_rotation_deg)
        self.zoom_range = (float(zoom_range[0]), float(zoom_range[1]))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.crop_padding > 0:
            images = random_crop_with_padding(images, self.crop_padding)
        if self.horizontal_flip:
            images = random_horizontal_flip(images)
        if self.max_rotation_deg > 0 or self.zoom_range != (1.0, 1.0):
            images = random_rotate_zoom(images, self.max_rotation_deg, self.zoom_range)
        return images


def random_crop_with_padding(images: torch.Tensor, padding: int, mode: str = "constant") -> torch.Tensor:
    """Pad each image (zeros; or F.pad's `mode`, e.g. "replicate": its own edge pixels) and cut a
    random window of the original size, i.e. shift it by up to `padding` pixels each way."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding), mode=mode)
    top = torch.randint(0, 2 * padding + 1, (n,))
    left = torch.randint(0, 2 * padding + 1, (n,))
    rows = (top[:, None] + torch.arange(h))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w))[:, None, None, :]
    batch_index = torch.arange(n)[:, None, None, None]
    channel_index = torch.arange(c)[None, :, None, None]
    return padded[batch_index, channel_index, rows, cols]


def random_horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0]) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_rotate_zoom(
    images: torch.Tensor, max_rotation_deg: float, zoom_range: tuple[float, float]
) -> torch.Tensor:
    """Rotate and zoom each image about its centre by a random amount (bilinear, border padding)."""
    n = images.shape[0]
    angle = (torch.rand(n) * 2 - 1) * math.radians(max_rotation_deg)
    zoom = zoom_range[0] + torch.rand(n) * (zoom_range[1] - zoom_range[0])
    # affine_grid maps output coordinates to input ones, so zooming in by z samples a 1/z region.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zeros = torch.zeros(n)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class BatchPreprocessor:
    """Turn stored uint8 images into model input: scale to [0, 1], augment, normalise, flatten.

    `mean`/`std` broadcast against one image (C, H, W); `std` may be None (mean
    subtraction only).
    """

    def __init__(
        self,
        pixel_scale: float,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        flatten: bool = False,
    ) -> None:
        self.pixel_scale = pixel_scale
        self.mean = mean
        self.std = std
        self.flatten = flatten

    def __call__(self, images: torch.Tensor, augment: TensorAugment | None) -> torch.Tensor:
        x = images.to(torch.float32) * self.pixel_scale
        if augment is not None:
            x = augment(x)
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        if self.flatten:
            x = x.reshape(x.shape[0], -1)
        return x.contiguous()


def normalization_shape(mode: str, input_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of the mean (and std) that `normalization_stats` gives for images of `input_shape` (C, H, W)."""
    return tuple(input_shape) if mode == "mean_image" else (input_shape[0], 1, 1)


def normalization_stats(
    images: torch.Tensor, pixel_scale: float, mode: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Mean (and std) of the scaled images of a split, for the given normalisation mode.

    "mean_image": the mean image (C, H, W), no std. "per_channel": mean and std
    per channel, shaped (C, 1, 1). Accumulates in float64 chunks so CIFAR-size
    splits need no full float copy.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
    if mode == "none":
        return None, None
    n, c = images.shape[:2]
    total = torch.zeros(images.shape[1:], dtype=torch.float64)
    total_sq = torch.zeros(images.shape[1:], dtype=torch.float64)
    for start in range(0, n, 4096):
        chunk = images[start : start + 4096].to(torch.float64) * pixel_scale
        total += chunk.sum(0)
        total_sq += (chunk * chunk).sum(0)
    if mode == "mean_image":
        return (total / n).to(torch.float32), None
    pixels_per_channel = n * images.shape[2] * images.shape[3]
    mean = total.reshape(c, -1).sum(1) / pixels_per_channel
    var = total_sq.reshape(c, -1).sum(1) / pixels_per_channel - mean * mean
    std = var.clamp_min(1e-12).sqrt()
    return mean.to(torch.float32).reshape(c, 1, 1), std.to(torch.float32).reshape(c, 1, 1)


# ---------------------------------------------------------------------------
# Dataset


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


# ---------------------------------------------------------------------------
# Image folders


def load_image(path: Path, size: tuple[int, int], channels: int = 1) -> np.ndarray:
    """Read an image file as uint8 (channels, H, W), resized to `size` (height, width) if needed.

    One channel is gray, three are RGB. Any mode Pillow reads is converted:
    palette, 16-bit gray (scaled to 8 bits), CMYK; an alpha channel is
    composited onto white. A JPEG's EXIF orientation is applied and an
    animated image gives its first frame. Whatever stops the file from
    decoding is a DataFormatError that names it.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels}")
    mode = "L" if channels == 1 else "RGB"
    height, width = size
    try:
        with Image.open(path) as opened:
            # A JPEG decodes at a reduced scale that still covers the target size (either orientation).
            opened.draft(mode, (max(size), max(size)))
            image = ImageOps.exif_transpose(opened)
            image = _to_mode(image, mode)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except Exception as error:  # any decoder failure means the same: this file cannot be used
        raise DataFormatError(f"cannot read image {path}: {error}. Replace or delete the file.") from error
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` in mode L or RGB: integer gray (read as 16-bit, PNG's deep gray) and float gray (read as
    0..255) brought to 8 bits, alpha composited onto white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 255.0 if image.mode == "F" else 65535.0
        image = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "RGBA", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == mode else image.convert(mode)


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def unpack_hint(data_dir: Path) -> str:
    """A sentence naming the archives lying in `data_dir` (data sets that read folders do not
    open archives), or "" when there are none."""
    if not data_dir.is_dir():
        return ""
    archives = sorted(
        child.name for child in data_dir.iterdir() if child.is_file() and child.name.lower().endswith(ARCHIVE_SUFFIXES)
    )
    if not archives:
        return ""
    return f" Found {', '.join(archives)} in {data_dir}: unpack it there first (archives are not read directly)."


def find_child_dir(parent: Path, name: str) -> Path | None:
    """The subfolder of `parent` called `name`, matched case-insensitively, or None."""
    exact = parent / name
    if exact.is_dir():
        return exact
    if not parent.is_dir():
        return None
    for child in sorted(parent.iterdir()):
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    return None


def read_class_folders(
    split_dir: Path, class_names: Sequence[str], size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the image files (IMAGE_EXTENSIONS) of `split_dir/<class>/` as grayscale images (N, 1, H, W)
    uint8 and labels.

    Label i is `class_names[i]`; folder names match case-insensitively and
    folders for other classes are ignored. Every listed class needs a
    non-empty folder. Within a class, files come in natural order of their
    names (`x_9.png` before `x_10.png`), so numbered video frames stay in
    frame order.
    """
    def natural_key(path: Path) -> tuple:
        # Digit runs compare as numbers; re.split with a group alternates text and digits,
        # so equal positions always hold the same type. The name breaks remaining ties.
        parts = re.split(r"(\d+)", path.name.lower())
        return tuple(int(part) if index % 2 else part for index, part in enumerate(parts)), path.name

    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, class_name in enumerate(class_names):
        class_dir = find_child_dir(split_dir, class_name)
        if class_dir is None:
            raise DataNotFoundError(
                f"missing class folder {split_dir / class_name}: every class "
                f"({', '.join(class_names)}) needs a folder of images in {split_dir}"
            )
        files = sorted(
            (p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
            key=natural_key,
        )
        if not files:
            raise DataNotFoundError(
                f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "put the class's images there"
            )
        for path in files:
            images.append(load_image(path, size, channels=1)[0])
            labels.append(label)
    stacked = torch.from_numpy(np.stack(images)).unsqueeze(1)
    return stacked, torch.tensor(labels, dtype=torch.int64)


def list_image_files(folder: Path) -> list[Path]:
    """Files under `folder` (all depths) whose suffix names an image format, sorted by relative
    path; hidden files and folders (a leading dot) are left out, and links to folders are not
    followed (no cycles)."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / name for name in files if not name.startswith(".")
                  and Path(name).suffix.lower() in IMAGE_EXTENSIONS]  # fmt: skip
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def read_image_folder(
    folder: Path, size: tuple[int, int], channels: int
) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
    """Every image file under `folder` as uint8 (N, channels, H, W), for prediction.

    Returns (images, their paths relative to `folder`, skipped files as (relative
    path, reason)). A file that is not a regular file or does not decode is skipped
    with a warning naming it; the others are still read. A missing folder, or one
    with no image files, is a DataNotFoundError.
    """
    if not folder.is_dir():
        raise DataNotFoundError(f"predict_dir is not a folder ({folder}): give a folder of images to classify")
    files = list_image_files(folder)
    if not files:
        raise DataNotFoundError(
            f"predict_dir holds no image files ({folder}): put the images to classify in it or its subfolders "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    images, names, skipped = [], [], []
    for path in files:
        name = path.relative_to(folder).as_posix()
        try:
            # Opening a FIFO or a device would block or never end: only regular files (links to them too).
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise DataFormatError(f"{path} is not a regular file")
            images.append(load_image(path, size, channels))
            names.append(name)
        except (DataFormatError, OSError) as error:
            skipped.append((name, str(error)))
            rank_zero_warn(f"skipped {name}: {error}")
    if not images:
        raise DataFormatError(f"none of the {len(files)} image files under {folder} could be read (see the warnings)")
    return torch.from_numpy(np.stack(images)), names, skipped


# ---------------------------------------------------------------------------
# DataModule base


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
        self._preprocessor = BatchPreprocessor(self.pixel_scale, mean, std, self.flatten)
        self.train_dataset = InMemoryImageDataset(
            train_images, train_labels, self._preprocessor, self.train_augment
        )
        self.val_dataset = InMemoryImageDataset(val_images, val_labels, self._preprocessor)

    def _setup_test(self) -> None:
        if self.test_dataset is not None:
            return
        test_images, test_labels = self._load_test_split()
        if self._preprocessor is None:
            self._preprocessor = BatchPreprocessor(self.pixel_scale, flatten=self.flatten)
        self.test_dataset = InMemoryImageDataset(test_images, test_labels, self._preprocessor)

    def _setup_predict_folder(self) -> None:
        if self._predict_images is not None:
            return
        channels, height, width = self.image_shape or self.input_shape
        self._predict_images, self.predict_files, self.predict_skipped = read_image_folder(
            self.predict_dir, (height, width), channels
        )

    def _predict_folder_dataset(self) -> InMemoryImageDataset:
        """predict_dir's images, preprocessed as the train split (built after a checkpoint is restored)."""
        assert self._predict_images is not None
        if self.normalize == "none":
            mean = std = None
        elif self._restored_statistics is not None:
            mean, std = self._restored_statistics
        elif self._preprocessor is not None:
            mean, std = self._preprocessor.mean, self._preprocessor.std
        else:
            raise CommandError(
                f"predicting images with normalize={self.normalize!r} needs the train split's statistics, and "
                "the checkpoint carries none",
                None,
                "pass a checkpoint written by fit (--ckpt_path), whose DataModule state carries them",
            )
        # Image files hold 0..255, whatever range the data set's own files store.
        preprocessor = BatchPreprocessor(1.0 / 255.0, mean, std, self.flatten)
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
        image_shape = self.image_shape or self.input_shape
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
