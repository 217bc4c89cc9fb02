"""UCI optical handwritten digits (8x8, 10 classes), shipped with the package for offline use."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_hw.data.base import ImageClassificationDataModule
from lightning_hw.data.errors import DataFormatError, DataNotFoundError
from lightning_hw.data.splits import seeded_split

DIGITS_FILE = Path(__file__).with_name("digits.npz")
DIGITS_MAX_VALUE = 16


def load_digits_npz(path: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the digits archive (default: the bundled one) as (images uint8 (N, 1, 8, 8) in 0..16, labels int64 (N,))."""
    path = DIGITS_FILE if path is None else path
    if not path.is_file():
        raise DataNotFoundError(f"digits data file {path} is missing: reinstall lightning_hw")
    try:
        loaded = np.load(path, allow_pickle=False)  # object arrays would unpickle: refused
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"a single {type(loaded).__name__}, not an .npz archive of 'images' and 'labels'")
        with loaded as archive:
            images, labels = archive["images"], archive["labels"]
    # MemoryError: a damaged header can claim an array far larger than the file.
    except (OSError, ValueError, KeyError, EOFError, MemoryError, zipfile.BadZipFile) as error:
        raise DataFormatError(f"cannot read digits data file {path} ({error}): reinstall lightning_hw") from error
    if (
        images.dtype != np.uint8
        or images.ndim != 3
        or images.shape[1:] != (8, 8)
        or labels.dtype.kind not in "iu"
        or labels.shape != images.shape[:1]
    ):
        raise DataFormatError(
            f"{path}: expected uint8 images (N, 8, 8) and N integer labels, found {images.dtype} {images.shape} "
            f"and {labels.dtype} {labels.shape}: reinstall lightning_hw"
        )
    if images.max(initial=0) > DIGITS_MAX_VALUE or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataFormatError(f"{path}: pixel values above {DIGITS_MAX_VALUE} or labels outside 0..9: reinstall lightning_hw")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


class DigitsDataModule(ImageClassificationDataModule):
    """Offline default: the 1,797 UCI optical handwritten digits (8x8, values 0..16, 10 classes).

    The data ship inside the package (`digits.npz`, attribution in
    DIGITS_LICENSE.txt). `data_dir` is accepted for a uniform signature and
    ignored. Seeded split into test (`test_size`), val (`val_size`) and train
    (the rest); sizes are counts or fractions of all images. Pixels are scaled
    to [0, 1] (x / 16); samples are (1, 8, 8).
    """

    pixel_scale = 1.0 / DIGITS_MAX_VALUE

    def __init__(
        self,
        data_dir: str | Path = "./data",
        batch_size: int = 64,
        val_size: int | float = 0.1,
        test_size: int | float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir=data_dir, batch_size=batch_size, val_size=val_size, **kwargs)
        self.save_hyperparameters()
        self.test_size = test_size
        self.num_classes = 10
        self.class_names = [str(digit) for digit in range(10)]
        self.input_shape = (1, 8, 8)
        self._split_indices: list[torch.Tensor] | None = None

    def _split(self, part: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Part 0 train (the rest), 1 val, 2 test."""
        images, labels = load_digits_npz()
        if self._split_indices is None:
            self._split_indices = seeded_split(len(labels), [self.val_size, self.test_size], self.seed)
        index = self._split_indices[part]
        return images[index], labels[index]

    def _load_fit_splits(self):
        return self._split(0), self._split(1)

    def _load_test_split(self):
        return self._split(2)
