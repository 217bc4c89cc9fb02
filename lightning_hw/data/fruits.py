"""The 3-class fruit task from Fruits-360 (`Training/<class>/*.jpg`, `Test/<class>/*.jpg`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_hw.data.base import (
    DataNotFoundError,
    ImageClassificationDataModule,
    TensorAugment,
    find_child_dir,
    read_class_folders,
    unpack_hint,
)

FRUITS_DEFAULT_CLASSES = ("Carambula", "Lychee", "Pear")
FRUITS_SOURCE_HINT = (
    "Get Fruits-360 (https://github.com/fruits-360) and put its Training and Test folders "
    "in {data_dir}, so that {data_dir}/Training/<class>/*.jpg and {data_dir}/Test/<class>/*.jpg "
    "exist for the classes {classes}."
)


class FruitsDataModule(ImageClassificationDataModule):
    """Fruits-360 classes (default Carambula, Lychee, Pear) as grayscale `image_size` x `image_size` images.

    Reads `<data_dir>/Training/<class>/*` (split into train and a seeded
    `val_size` validation part) and `<data_dir>/Test/<class>/*` (test);
    images are converted to grayscale and resized with Pillow. Folders of
    other classes are ignored. `augment` flips train images horizontally at random.
    """

    def __init__(
        self,
        data_dir: str | Path = "./data",
        batch_size: int = 32,
        val_size: int | float = 0.1,
        class_names: Sequence[str] = FRUITS_DEFAULT_CLASSES,
        image_size: int = 32,
        augment: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            val_size=val_size,
            augment=TensorAugment(horizontal_flip=True) if augment else None,
            **kwargs,
        )
        if len(class_names) < 2:
            raise ValueError(f"class_names needs at least two classes, got {list(class_names)}")
        self.save_hyperparameters()
        self.num_classes = len(class_names)
        self.class_names = list(class_names)
        self.image_size = int(image_size)
        self.input_shape = (1, self.image_size, self.image_size)

    def _split_dir(self, name: str) -> Path:
        split_dir = find_child_dir(self.data_dir, name)
        if split_dir is None:
            hint = FRUITS_SOURCE_HINT.format(data_dir=self.data_dir, classes=", ".join(self.class_names))
            raise DataNotFoundError(f"Fruits-360 folder {self.data_dir / name} not found. {hint}{unpack_hint(self.data_dir)}")
        return split_dir

    def prepare_data(self) -> None:
        """Check that the Training and Test folders are present (no automatic download)."""
        self._split_dir("Training")
        self._split_dir("Test")

    def _read_split(self, name: str):
        return read_class_folders(self._split_dir(name), self.class_names, (self.image_size, self.image_size))

    def _load_fit_splits(self):
        images, labels = self._read_split("Training")
        return self._hold_out_val(images, labels)

    def _load_test_split(self):
        return self._read_split("Test")
