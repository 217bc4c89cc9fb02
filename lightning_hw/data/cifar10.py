"""CIFAR-10 from the official python-pickle batches (`cifar-10-batches-py`)."""

from __future__ import annotations

import codecs
import gzip
import hashlib
import http.client
import lzma
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_hw.data.augmentation import TensorAugment
from lightning_hw.data.base import ImageClassificationDataModule
from lightning_hw.data.errors import DataFormatError, DataNotFoundError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_NAME = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_CLASS_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
CIFAR10_IMAGE_SHAPE = (3, 32, 32)


def _latin1_encode(text: str, encoding: str) -> bytes:
    """`codecs.encode` as a protocol-2 pickle of bytes calls it, and only so.

    Other codecs (zlib, bz2, rot13, ...) have no place in a CIFAR batch and
    are refused rather than handed to the codec registry.
    """
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"codecs.encode({type(text).__name__}, {encoding!r}) is not how a pickle stores bytes")
    return codecs.encode(text, "latin1")


def _allowed_pickle_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch needs: numpy array reconstruction and protocol-2 bytes."""
    try:
        from numpy._core.multiarray import _reconstruct as reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct as reconstruct  # numpy 1.x

    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("codecs", "encode"): _latin1_encode,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy uint8 arrays need and refuses any other.

    A pickle naming anything else (os.system, builtins.eval, ...) is rejected
    before that object is ever called.
    """

    def __init__(self, file: Any, source_path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.source_path = source_path
        self.allowed = _allowed_pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DataFormatError(
                f"{self.source_path}: refusing to unpickle forbidden global {module}.{name}; "
                "a CIFAR-10 batch only holds numpy arrays and lists. The file is corrupt or "
                "not a CIFAR-10 batch: delete it and download the data set again."
            ) from None


def load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 pickle batch as (images uint8 (N, 3, 32, 32), labels int64 (N,))."""
    redownload = f"delete {path.parent} and download the data set again ({CIFAR10_URL})"
    try:
        with open(path, "rb") as file:
            batch = RestrictedUnpickler(file, path).load()
    except FileNotFoundError:
        raise DataNotFoundError(f"missing CIFAR-10 batch file {path}: {redownload}") from None
    except DataFormatError:
        raise
    except Exception as error:  # truncated or garbled pickles fail in many ways
        raise DataFormatError(f"cannot unpickle CIFAR-10 batch {path} ({error!r}): {redownload}") from error
    if not isinstance(batch, dict):
        raise DataFormatError(f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict: {redownload}")
    entries = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    missing = {"data", "labels"} - entries.keys()
    if missing:
        raise DataFormatError(f"{path} lacks the keys {sorted(missing)} of a CIFAR-10 batch: {redownload}")
    data, labels = entries["data"], entries["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFormatError(f"{path}: 'data' must be a uint8 array (N, 3072), found {found}: {redownload}")
    try:
        label_array = np.asarray(labels)
    except (TypeError, ValueError) as error:  # ragged nested lists
        raise DataFormatError(f"{path}: 'labels' are not a list of integers ({error}): {redownload}") from error
    # Without a dtype, numpy keeps what the file holds: floats, strings or booleans are
    # refused instead of being truncated or parsed into labels (an empty list reads as float).
    if label_array.size and label_array.dtype.kind not in "iu":
        raise DataFormatError(f"{path}: 'labels' must be integers, found {label_array.dtype}: {redownload}")
    label_array = label_array.astype(np.int64)
    if label_array.shape != (data.shape[0],):
        raise DataFormatError(
            f"{path}: {label_array.shape} labels for {data.shape[0]} images: {redownload}"
        )
    if label_array.size and (label_array.min() < 0 or label_array.max() > 9):
        raise DataFormatError(f"{path}: labels outside 0..9: {redownload}")
    return data.reshape(-1, *CIFAR10_IMAGE_SHAPE), label_array


def download_file(url: str, destination: Path, timeout: float) -> None:
    """Fetch `url` into `destination` (written to a .part file first, then renamed)."""
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
        partial.replace(destination)
    finally:
        partial.unlink(missing_ok=True)


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# What reading a damaged archive raises besides TarError: the decompressors' own errors,
# and OSErrors without an errno (gzip's BadGzipFile, bz2's "Invalid data stream").
_ARCHIVE_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile, OSError)


def safe_extract_tar(archive: Path, target_dir: Path) -> None:
    """Extract a tarball into `target_dir`, refusing members that could land outside it.

    Only regular files and folders are accepted (no links, devices or FIFOs),
    and every member's resolved path must stay inside `target_dir`; tarfile's
    "data" filter is applied on top. Members are unpacked into a temporary
    folder inside `target_dir` and moved into place only once the whole
    archive has been read, so a damaged archive leaves nothing behind.
    """
    target = target_dir.resolve()
    fix = "delete it and download it again"
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                destination = (target / member.name).resolve()
                if not (member.isfile() or member.isdir()):
                    raise DataFormatError(
                        f"{archive}: refusing tar member {member.name!r}: not a regular file or folder; {fix}"
                    )
                if member.name.startswith("/") or not destination.is_relative_to(target):
                    raise DataFormatError(
                        f"{archive}: refusing tar member {member.name!r}: its path leaves {target}; {fix}"
                    )
            staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=target))
            try:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, members=members, filter="data")
                else:  # Python without extraction filters: the checks above already refuse unsafe members
                    tar.extractall(staging, members=members)
                _move_tree(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except _ARCHIVE_READ_ERRORS as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise  # a file-system error (disk full, permissions), not a damaged archive
        raise DataFormatError(f"{archive} is not a readable tar archive ({error!r}): {fix}") from error


def _move_tree(source: Path, target: Path) -> None:
    """Move every file under `source` to the same relative place under `target` (folders merged)."""
    for folder, _, files in os.walk(source):
        destination_dir = target / Path(folder).relative_to(source)
        destination_dir.mkdir(parents=True, exist_ok=True)
        for name in files:
            os.replace(Path(folder) / name, destination_dir / name)


class CIFAR10DataModule(ImageClassificationDataModule):
    """CIFAR-10 (10 classes, 32x32 RGB) read from `<data_dir>/cifar-10-batches-py`.

    Splits: `val_size` images (count or fraction, seeded by `seed`) of the
    50,000 training images are held out for validation (49,000/1,000 by
    default); the test split is the official test batch. `prepare_data`
    downloads and unpacks the official archive when the folder is missing and
    `download` is true. Options: `normalize` ("none", "mean_image" subtracts the
    train mean image, "per_channel" standardises with train channel mean/std),
    `flatten` (samples become vectors (3072,)), `augment` (random crop with
    4-pixel zero padding and horizontal flip, train split only).
    """

    def __init__(
        self,
        data_dir: str | Path = "./data",
        batch_size: int = 128,
        val_size: int | float = 1000,
        flatten: bool = False,
        augment: bool = False,
        download: bool = True,
        download_timeout: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            val_size=val_size,
            flatten=flatten,
            augment=TensorAugment(crop_padding=4, horizontal_flip=True) if augment else None,
            **kwargs,
        )
        self.save_hyperparameters()
        self.download = download
        self.download_timeout = download_timeout
        self.num_classes = 10
        self.class_names = list(CIFAR10_CLASS_NAMES)
        self.image_shape = CIFAR10_IMAGE_SHAPE
        self.input_shape = (3 * 32 * 32,) if flatten else CIFAR10_IMAGE_SHAPE

    @property
    def batches_dir(self) -> Path:
        return self.data_dir / CIFAR10_FOLDER

    def _missing_files(self) -> list[str]:
        names = (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)
        return [name for name in names if not (self.batches_dir / name).is_file()]

    def _manual_download_hint(self) -> str:
        return (
            f"Download {CIFAR10_URL} (MD5 {CIFAR10_ARCHIVE_MD5}) and either put it at "
            f"{self.data_dir / CIFAR10_ARCHIVE_NAME} or unpack it so that "
            f"{self.batches_dir}/data_batch_1 exists."
        )

    def prepare_files(self) -> None:
        """Download, check and unpack the official archive if the batch folder is incomplete."""
        if not self._missing_files():
            return
        archive = self.data_dir / CIFAR10_ARCHIVE_NAME
        if not archive.is_file():
            if not self.download:
                raise DataNotFoundError(
                    f"CIFAR-10 not found in {self.batches_dir} and download=False. {self._manual_download_hint()}"
                )
            self.data_dir.mkdir(parents=True, exist_ok=True)
            try:
                download_file(CIFAR10_URL, archive, self.download_timeout)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                raise DataNotFoundError(
                    f"could not download CIFAR-10 ({error}). {self._manual_download_hint()}"
                ) from error
        actual_md5 = file_md5(archive)
        if actual_md5 != CIFAR10_ARCHIVE_MD5:
            raise DataFormatError(
                f"{archive} has MD5 {actual_md5}, expected {CIFAR10_ARCHIVE_MD5}: the file is corrupt "
                f"or not the CIFAR-10 archive. Delete it and download it again from {CIFAR10_URL}."
            )
        safe_extract_tar(archive, self.data_dir)
        missing = self._missing_files()
        if missing:
            raise DataFormatError(
                f"{archive} unpacked without {', '.join(missing)} in {self.batches_dir}. {self._manual_download_hint()}"
            )

    def _check_present(self) -> None:
        missing = self._missing_files()
        if missing:
            raise DataNotFoundError(
                f"CIFAR-10 files missing in {self.batches_dir}: {', '.join(missing)}. "
                f"Run prepare_data() to download them, or: {self._manual_download_hint()}"
            )

    def _load_fit_splits(self):
        self._check_present()
        batches = [load_cifar_batch(self.batches_dir / name) for name in CIFAR10_TRAIN_BATCHES]
        images = torch.from_numpy(np.concatenate([b[0] for b in batches]))
        labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
        return self._hold_out_val(images, labels)

    def _load_test_split(self):
        self._check_present()
        images, labels = load_cifar_batch(self.batches_dir / CIFAR10_TEST_BATCH)
        return torch.from_numpy(images), torch.from_numpy(labels)
