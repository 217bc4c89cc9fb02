"""Writers of small fake data sets in the real on-disk formats, for tests (and
helpers that read a DataModule's loader back and run the command line).

Images are class-dependent (a per-class template plus noise), so models can
learn them. Every writer is deterministic for a given seed and returns the
folder (or file) that the matching DataModule reads via `data_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

CIFAR10_LABEL_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
FER2013_FOLDER_NAMES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
FRUITS_DEFAULT_CLASSES = ("Carambula", "Lychee", "Pear")


def class_pattern_images(
    labels: np.ndarray, shape: tuple[int, ...], num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """uint8 images of `shape` (C, H, W) whose content depends on the label.

    Class c has a fixed template (a brightness level rising with c and a stripe
    pattern whose orientation and frequency depend on c) plus mild noise.
    """
    channels, height, width = shape
    rows, cols = np.mgrid[0:height, 0:width]
    templates = []
    for label in range(num_classes):
        level = 40 + 170 * label / max(num_classes - 1, 1)
        stripes = np.sin((rows if label % 2 else cols) * (label + 1) * np.pi / height)
        per_channel = [level + 35 * stripes * (1 if ch % 2 == 0 else -1) for ch in range(channels)]
        templates.append(np.stack(per_channel))
    templates_array = np.stack(templates)
    noise = rng.normal(0, 12, size=(len(labels), *shape))
    return np.clip(templates_array[labels] + noise, 0, 255).astype(np.uint8)


def _balanced_labels(count: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels covering every class as evenly as possible, in random order."""
    return rng.permutation(np.arange(count) % num_classes)


# ---------------------------------------------------------------------------
# CIFAR-10


def write_cifar_batch(path: Path, images: np.ndarray, labels: Sequence[int], batch_label: str) -> Path:
    """Write one batch like the official files: pickle protocol 2, byte keys, data uint8 (N, 3072)."""
    batch = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(label) for label in labels],
        b"data": np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.uint8),
        b"filenames": [f"fake_{i:05d}.png".encode() for i in range(len(images))],
    }
    with open(path, "wb") as file:
        pickle.dump(batch, file, protocol=2)
    return path


def write_cifar10(root: Path, n_train_per_batch: int = 30, n_test: int = 30, seed: int = 0) -> Path:
    """Write `root/cifar-10-batches-py` (data_batch_1..5, test_batch, batches.meta); return that folder."""
    rng = np.random.default_rng(seed)
    batches_dir = Path(root) / "cifar-10-batches-py"
    batches_dir.mkdir(parents=True, exist_ok=True)
    for index in range(1, 6):
        labels = _balanced_labels(n_train_per_batch, 10, rng)
        images = class_pattern_images(labels, (3, 32, 32), 10, rng)
        write_cifar_batch(batches_dir / f"data_batch_{index}", images, labels, f"training batch {index} of 5")
    labels = _balanced_labels(n_test, 10, rng)
    images = class_pattern_images(labels, (3, 32, 32), 10, rng)
    write_cifar_batch(batches_dir / "test_batch", images, labels, "testing batch 1 of 1")
    meta = {b"num_cases_per_batch": n_train_per_batch, b"label_names": [n.encode() for n in CIFAR10_LABEL_NAMES], b"num_vis": 3072}
    with open(batches_dir / "batches.meta", "wb") as file:
        pickle.dump(meta, file, protocol=2)
    return batches_dir


def write_cifar10_tarball(path: Path, n_train_per_batch: int = 30, n_test: int = 30, seed: int = 0) -> str:
    """Write a fake `cifar-10-python.tar.gz` with the official layout at `path`; return its MD5."""
    path = Path(path)
    staging = path.parent / f".staging-{path.name}"
    batches_dir = write_cifar10(staging, n_train_per_batch, n_test, seed)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(batches_dir, arcname="cifar-10-batches-py")
    for file in batches_dir.iterdir():
        file.unlink()
    batches_dir.rmdir()
    staging.rmdir()
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_tarball_with_members(path: Path, members: dict[str, bytes]) -> str:
    """Write a .tar.gz holding the given member names (verbatim, e.g. '../evil') and contents; return its MD5."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------
# FER2013


def fer2013_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class-dependent 48x48 grayscale uint8 images (N, 48, 48) for FER2013 labels 0..6."""
    return class_pattern_images(labels, (1, 48, 48), 7, rng)[:, 0]


def write_fer2013_csv(
    root: Path, n_per_usage: int = 21, seed: int = 0, class_counts: Sequence[int] | None = None
) -> Path:
    """Write `root/fer2013.csv` with Kaggle's header `emotion,pixels,Usage`; return the file path.

    Each of Training / PublicTest / PrivateTest gets `n_per_usage` rows with
    labels cycling over the 7 classes, unless `class_counts` (7 numbers) gives
    the per-class row count of every usage (to make an imbalanced set).
    """
    rng = np.random.default_rng(seed)
    path = Path(root) / "fer2013.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["emotion,pixels,Usage"]
    for usage in ("Training", "PublicTest", "PrivateTest"):
        if class_counts is None:
            labels = _balanced_labels(n_per_usage, 7, rng)
        else:
            labels = rng.permutation(np.repeat(np.arange(7), class_counts))
        for label, image in zip(labels, fer2013_images(labels, rng)):
            lines.append(f"{label},{' '.join(map(str, image.ravel()))},{usage}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_fer2013_folders(
    root: Path, n_train_per_class: int = 6, n_test_per_class: int = 3, seed: int = 0
) -> Path:
    """Write `root/train/<emotion>/*` and `root/test/<emotion>/*` (48x48 grayscale); return root.

    Files alternate between PNG and JPEG so both readers are exercised.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        for label, name in enumerate(FER2013_FOLDER_NAMES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            images = fer2013_images(np.full(per_class, label), rng)
            for index, image in enumerate(images):
                suffix = "png" if index % 2 == 0 else "jpg"
                Image.fromarray(image).save(folder / f"im{index}.{suffix}")
    return root


# ---------------------------------------------------------------------------
# Fruits: Fruits-360's Training/Test layout and the course's Data_train/Data_test

# Each layout's (train folder, test folder).
FRUITS_LAYOUT_FOLDERS = {"fruits-360": ("Training", "Test"), "course": ("Data_train", "Data_test")}


def _fruit_file_stem(layout: str, class_name: str, split_kind: str, index: int) -> str:
    """The file name (no suffix) of frame `index` of `class_name` in the "train" or "test" split."""
    if layout == "course":
        return f"{class_name}_{split_kind}_{index}"  # Carambula_train_12
    return f"{index}_100"  # Fruits-360: 12_100


def fruit_frames(label: int, count: int, size: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """`count` consecutive frames (count, 3, size, size) uint8 of a rotating fake fruit of class `label`.

    The class template (as `class_pattern_images`) plus a bright spot that
    circles the centre once over the sequence: neighbouring frames are near
    copies of each other, as in the real data's video frames.
    """
    frames = class_pattern_images(np.full(count, label), (3, size, size), num_classes, rng).astype(np.float64)
    rows, cols = np.mgrid[0:size, 0:size]
    angles = 2 * np.pi * np.arange(count) / max(count, 1)
    centre_row = size / 2 + size / 4 * np.sin(angles)
    centre_col = size / 2 + size / 4 * np.cos(angles)
    distance_sq = (rows - centre_row[:, None, None]) ** 2 + (cols - centre_col[:, None, None]) ** 2
    spot = 30 * np.exp(-distance_sq / (2 * (size / 8) ** 2))
    return np.clip(frames + spot[:, None], 0, 255).astype(np.uint8)


def _fruit_image(frame: np.ndarray, mode: str) -> Image.Image:
    """A PIL image in `mode` from an RGB frame (3, H, W); alpha channels are 255 everywhere (opaque)."""
    rgb = Image.fromarray(np.ascontiguousarray(frame.transpose(1, 2, 0)))
    return rgb.convert(mode)


def write_fruits(
    root: Path,
    classes: Sequence[str] = FRUITS_DEFAULT_CLASSES,
    n_train: int = 10,
    n_test: int = 4,
    size: int = 100,
    seed: int = 0,
    layout: str = "fruits-360",
    mode: str | None = None,
) -> Path:
    """Write fake fruit images in one of the two real layouts; return root.

    layout "fruits-360": `root/Training/<class>/<i>_100.jpg` and `root/Test/<class>/<i>_100.jpg`,
    RGB, the last image of each class folder a PNG and the others JPEG (Fruits-360's files).
    layout "course": `root/Data_train/<class>/<class>_train_<i>.png` and
    `root/Data_test/<class>/<class>_test_<i>.png`, PNG in mode LA with alpha 255 (the course's files).
    `mode` overrides the image mode (L, LA, RGB, RGBA; JPEG files only take L and RGB).
    `n_train` / `n_test` are images per class; image i is frame i of a rotating fake fruit
    (`fruit_frames`), one sequence per class and split.
    """
    if layout not in FRUITS_LAYOUT_FOLDERS:
        raise ValueError(f"layout must be one of {list(FRUITS_LAYOUT_FOLDERS)}, got {layout!r}")
    mode = mode or ("LA" if layout == "course" else "RGB")
    rng = np.random.default_rng(seed)
    root = Path(root)
    train_folder, test_folder = FRUITS_LAYOUT_FOLDERS[layout]
    for split, split_kind, per_class in ((train_folder, "train", n_train), (test_folder, "test", n_test)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index, frame in enumerate(fruit_frames(label, per_class, size, len(classes), rng)):
                as_jpeg = layout == "fruits-360" and index != per_class - 1 and mode in ("L", "RGB")
                suffix = "jpg" if as_jpeg else "png"
                _fruit_image(frame, mode).save(folder / f"{_fruit_file_stem(layout, name, split_kind, index)}.{suffix}")
    return root


def collect_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """All (x, y) batches of a DataLoader, concatenated."""
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------------------
# Hostile files


class CallOnUnpickle:
    """Pickles as the call `function(*args)`: what a malicious data file would make the loader run."""

    def __init__(self, function, *args) -> None:
        self.function = function
        self.args = args

    def __reduce__(self):
        return (self.function, self.args)


def tar_entry(name: str, kind: bytes = tarfile.REGTYPE, content: bytes = b"", linkname: str = "") -> tuple:
    """One member for `write_tar`: a TarInfo of the given type (REGTYPE, SYMTYPE, LNKTYPE, CHRTYPE, ...) and its data."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(content) if kind == tarfile.REGTYPE else 0
    return info, content


def write_tar(path: Path, entries: Sequence[tuple], compression: str = "gz") -> str:
    """Write a tar archive (compression "gz", "bz2", "xz" or "") of `tar_entry` members verbatim; return its MD5."""
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(path, mode) as tar:
        for info, content in entries:
            tar.addfile(info, io.BytesIO(content) if info.isfile() else None)
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


class PauseAtTrainBatch(pl.Callback):
    """At the start of training batch `batch_index` of epoch `epoch`: write the global step into
    `marker`, then sleep, so that a test can kill the process at a known point mid-epoch.

    Used from a config (class_path fakes.PauseAtTrainBatch, with tests/ on PYTHONPATH). After
    `seconds` the run goes on by itself, so a test that never kills it cannot hang forever.
    """

    def __init__(self, epoch: int, batch_index: int, marker: str, seconds: float = 300.0) -> None:
        self.epoch = epoch
        self.batch_index = batch_index
        self.marker = Path(marker)
        self.seconds = seconds

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch_index:
            self.marker.write_text(str(trainer.global_step))
            time.sleep(self.seconds)


class InterruptAtTrainBatch(pl.Callback):
    """Raise KeyboardInterrupt (as Ctrl-C does) at the start of training batch `batch_index` of epoch `epoch`.

    Used from a config (class_path fakes.InterruptAtTrainBatch). Lightning then ignores SIGINT
    for the rest of the process: a test restores the handler afterwards.
    """

    def __init__(self, epoch: int, batch_index: int) -> None:
        self.epoch = epoch
        self.batch_index = batch_index

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch_index:
            raise KeyboardInterrupt


# ---------------------------------------------------------------------------
# A folder of photos to classify (predict --data.predict_dir, exported models)


def write_photo_folder(folder: Path, rng: np.random.Generator) -> dict[str, Image.Image]:
    """Images in several formats, modes and sizes (some in a subfolder), plus files that are not images
    or cannot be read. Returns the readable ones by relative path, as Pillow images."""
    (folder / "holiday" / "day 2").mkdir(parents=True)

    def pixels(height, width, channels):
        return rng.integers(0, 256, (height, width, channels), dtype=np.uint8).squeeze(-1 if channels == 1 else None)

    images = {
        "cat.png": Image.fromarray(pixels(32, 32, 3), "RGB"),
        "holiday/photo.jpg": Image.fromarray(pixels(40, 48, 3), "RGB"),
        "holiday/day 2/scan.bmp": Image.fromarray(pixels(40, 24, 1), "L"),
        "logo.png": Image.fromarray(pixels(20, 20, 4), "RGBA"),
        "small.gif": Image.fromarray(pixels(16, 16, 3), "RGB").convert("P"),
        "gray16.png": Image.fromarray((rng.integers(0, 65536, (33, 31)) // 1).astype(np.uint16)),
    }
    for name, image in images.items():
        image.save(folder / name)
    with Image.open(folder / "holiday/photo.jpg") as decoded:  # JPEG is lossy: what the file holds
        images["holiday/photo.jpg"] = decoded.copy()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))  # signature, then garbage
    jpeg = io.BytesIO()
    Image.fromarray(pixels(64, 64, 3), "RGB").save(jpeg, "JPEG")
    (folder / "holiday" / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])
    os.mkfifo(folder / "pipe.png")  # reading it would block forever
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"hidden files are left out")
    return images


def printed_by(args: list[str]) -> str:
    """What `python -m lightning_hw ARGS` prints, run in this process."""
    from lightning_hw.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(args)
    return printed.getvalue()
