"""FER2013 facial expressions, from Kaggle's `fer2013.csv` or the train/test image-folder layout."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_hw.data.augmentation import TensorAugment
from lightning_hw.data.base import ImageClassificationDataModule
from lightning_hw.data.errors import DataFormatError, DataNotFoundError
from lightning_hw.data.images import find_child_dir, read_class_folders, unpack_hint

FER2013_CLASS_NAMES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
FER2013_CSV_NAME = "fer2013.csv"
# The labels as the file writes them: plain ASCII digits ("3", not "03", "+3" or "³").
FER2013_LABEL_TEXTS = {str(label): label for label in range(len(FER2013_CLASS_NAMES))}
FER2013_USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FER2013_IMAGE_SIZE = 48
FER2013_SOURCE_HINT = (
    "FER2013 cannot be downloaded automatically. Get it from Kaggle, competition "
    '"Challenges in Representation Learning: Facial Expression Recognition Challenge" '
    "(https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge/data), "
    "and put fer2013.csv at {csv_path}, or the image folders at {data_dir}/train/<emotion>/*.jpg "
    "and {data_dir}/test/<emotion>/*.jpg (emotion folders: "
    + ", ".join(name.lower() for name in FER2013_CLASS_NAMES)
    + ")."
)


def read_fer2013_csv(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read Kaggle's fer2013.csv into {"train"|"val"|"test": (images uint8 (N, 1, 48, 48), labels int64)}.

    Usage Training/PublicTest/PrivateTest map to train/val/test. Errors name
    the file and the line.
    """
    pixels_per_image = FER2013_IMAGE_SIZE * FER2013_IMAGE_SIZE
    images: dict[str, list[np.ndarray]] = {split: [] for split in FER2013_USAGE_TO_SPLIT.values()}
    labels: dict[str, list[int]] = {split: [] for split in FER2013_USAGE_TO_SPLIT.values()}
    fix = "Replace the file with an intact copy of Kaggle's fer2013.csv."
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = [column.strip() for column in next(reader, [])]
            required = ("emotion", "pixels", "Usage")
            missing = [column for column in required if column not in header]
            if missing:
                raise DataFormatError(
                    f"{path}: header {header} lacks the column(s) {missing}; expected the header "
                    f"'emotion,pixels,Usage'. {fix}"
                )
            emotion_col, pixels_col, usage_col = (header.index(c) for c in required)
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataFormatError(f"{path}, line {line}: {len(row)} fields, expected {len(header)}. {fix}")
                usage = row[usage_col].strip()
                split = FER2013_USAGE_TO_SPLIT.get(usage)
                if split is None:
                    raise DataFormatError(
                        f"{path}, line {line}: Usage {usage!r} is not one of "
                        f"{list(FER2013_USAGE_TO_SPLIT)}. {fix}"
                    )
                emotion_text = row[emotion_col].strip()
                if emotion_text not in FER2013_LABEL_TEXTS:
                    raise DataFormatError(
                        f"{path}, line {line}: emotion {emotion_text!r} is not a label 0..6. {fix}"
                    )
                try:
                    # Fast C parser; on anything but whitespace-separated integers numpy 2
                    # raises ValueError, numpy 1 warns and returns the numbers before it.
                    with warnings.catch_warnings():
                        warnings.simplefilter("error", DeprecationWarning)
                        pixels = np.fromstring(row[pixels_col], dtype=np.int64, sep=" ")
                except (ValueError, DeprecationWarning):
                    pixels = None
                if pixels is None or pixels.size != pixels_per_image:
                    count = len(row[pixels_col].split())
                    raise DataFormatError(
                        f"{path}, line {line}: pixels must be {pixels_per_image} space-separated "
                        f"integers, found {count} fields{'' if pixels is not None else ' (not all integers)'}. {fix}"
                    )
                if pixels.min() < 0 or pixels.max() > 255:
                    raise DataFormatError(f"{path}, line {line}: pixel values outside 0..255. {fix}")
                images[split].append(pixels.astype(np.uint8))
                labels[split].append(FER2013_LABEL_TEXTS[emotion_text])
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path} is not a text CSV file ({error}). {fix}") from error
    except csv.Error as error:
        raise DataFormatError(f"{path}: malformed CSV ({error}). {fix}") from error
    result = {}
    for split in images:
        if images[split]:
            stacked = np.stack(images[split]).reshape(-1, 1, FER2013_IMAGE_SIZE, FER2013_IMAGE_SIZE)
        else:
            stacked = np.zeros((0, 1, FER2013_IMAGE_SIZE, FER2013_IMAGE_SIZE), dtype=np.uint8)
        result[split] = (torch.from_numpy(stacked), torch.tensor(labels[split], dtype=torch.int64))
    return result


class FER2013DataModule(ImageClassificationDataModule):
    """FER2013 facial expressions: 48x48 grayscale, 7 classes (Angry ... Neutral).

    Reads `<data_dir>/fer2013.csv` (Usage Training/PublicTest/PrivateTest =
    train/val/test) or, when that file is absent, the folder layout
    `<data_dir>/train/<emotion>/*` and `<data_dir>/test/<emotion>/*`, where val
    is a seeded `val_size` part of train. `augment` applies random horizontal
    flips, rotations up to `max_rotation_deg` and zooms in `zoom_range` to the
    train split. `normalize`: "none" (pixels in [0, 1]), "per_channel"
    (standardise with the train mean/std) or "mean_image". For class imbalance
    see `class_weights` (for a weighted loss), `balanced_sampler` (sample train
    batches uniformly over classes) and `class_distribution_table()`.
    """

    def __init__(
        self,
        data_dir: str | Path = "./data",
        batch_size: int = 64,
        val_size: int | float = 0.1,
        augment: bool = False,
        max_rotation_deg: float = 10.0,
        zoom_range: tuple[float, float] = (0.9, 1.1),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            val_size=val_size,
            augment=(
                TensorAugment(horizontal_flip=True, max_rotation_deg=max_rotation_deg, zoom_range=zoom_range)
                if augment
                else None
            ),
            **kwargs,
        )
        self.save_hyperparameters()
        self.num_classes = len(FER2013_CLASS_NAMES)
        self.class_names = list(FER2013_CLASS_NAMES)
        self.input_shape = (1, FER2013_IMAGE_SIZE, FER2013_IMAGE_SIZE)
        self._csv_splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def csv_path(self) -> Path:
        return self.data_dir / FER2013_CSV_NAME

    def _missing_data_error(self, detail: str) -> DataNotFoundError:
        hint = FER2013_SOURCE_HINT.format(csv_path=self.csv_path, data_dir=self.data_dir)
        return DataNotFoundError(f"{detail}. {hint}{unpack_hint(self.data_dir)}")

    def prepare_files(self) -> None:
        """Check that the data set is present (it cannot be downloaded automatically)."""
        if not self.csv_path.is_file() and find_child_dir(self.data_dir, "train") is None:
            raise self._missing_data_error(f"FER2013 not found: neither {self.csv_path} nor {self.data_dir / 'train'} exists")

    def _split_from_csv(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._csv_splits is None:
            self._csv_splits = read_fer2013_csv(self.csv_path)
        images, labels = self._csv_splits[split]
        if len(labels) == 0:
            raise DataFormatError(f"{self.csv_path} has no rows for the {split} split; it looks truncated.")
        return images, labels

    def _split_from_folders(self, folder: str) -> tuple[torch.Tensor, torch.Tensor]:
        split_dir = find_child_dir(self.data_dir, folder)
        if split_dir is None:
            raise self._missing_data_error(f"FER2013 not found: neither {self.csv_path} nor {self.data_dir / folder} exists")
        size = (FER2013_IMAGE_SIZE, FER2013_IMAGE_SIZE)
        return read_class_folders(split_dir, [name.lower() for name in FER2013_CLASS_NAMES], size)

    def _load_fit_splits(self):
        if self.csv_path.is_file():
            return self._split_from_csv("train"), self._split_from_csv("val")
        images, labels = self._split_from_folders("train")
        return self._hold_out_val(images, labels)

    def _load_test_split(self):
        if self.csv_path.is_file():
            return self._split_from_csv("test")
        return self._split_from_folders("test")
