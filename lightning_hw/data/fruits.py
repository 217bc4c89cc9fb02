"""The 3-class fruit task (Carambula, Lychee, Pear) in the course's layout or Fruits-360's.

Two folder layouts hold the same kind of images, and `FruitsDataModule` finds which one
`data_dir` holds:

- the course's: `Data_train/<Class>/<Class>_train_<i>.png` and `Data_test/<Class>/<Class>_test_<i>.png`
  (32x32 PNG, gray plus alpha);
- Fruits-360's: `Training/<class>/<i>_100.jpg` and `Test/<class>/<i>_100.jpg` (100x100 RGB JPEG).

In both, the images of a class are consecutive video frames of one rotating fruit, numbered
by frame; this shapes how a validation part is held out (`frame_block_split`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_hw.data.augmentation import TensorAugment, random_crop_with_padding
from lightning_hw.data.base import ImageClassificationDataModule
from lightning_hw.data.errors import DataNotFoundError
from lightning_hw.data.images import find_child_dir, read_class_folders, unpack_hint
from lightning_hw.data.splits import resolve_split_size

FRUITS_DEFAULT_CLASSES = ("Carambula", "Lychee", "Pear")
# layout name -> (train folder, test folder), in the order auto-detection prefers them.
FRUITS_LAYOUTS = {"course": ("Data_train", "Data_test"), "fruits-360": ("Training", "Test")}
FRUITS_LAYOUT_CHOICES = ("auto", *FRUITS_LAYOUTS)
VAL_SPLITS = ("blocks", "random")
FRUITS_SOURCE_HINT = (
    "Expected either the course's layout, {data_dir}/Data_train/<class>/*.png and "
    "{data_dir}/Data_test/<class>/*.png, or Fruits-360's (https://github.com/fruits-360), "
    "{data_dir}/Training/<class>/*.jpg and {data_dir}/Test/<class>/*.jpg, for the classes {classes}."
)


def apportion(count: int, group_sizes: Sequence[int]) -> list[int]:
    """Split `count` over groups in proportion to their sizes, as integers that sum to `count`.

    Largest remainders get the leftover units (ties: the earlier group).
    """
    total = sum(group_sizes)
    quotas = [count * size / total for size in group_sizes]
    shares = [int(quota) for quota in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda group: (shares[group] - quotas[group], group))
    for group in by_remainder[: count - sum(shares)]:
        shares[group] += 1
    return shares


def frame_block_split(
    labels: torch.Tensor, val_size: int | float, blocks_per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) that hold out contiguous runs of frames of each class.

    `labels` are in file order: within a class, in frame order. `val_size` (a
    count or a fraction of all samples) is shared out over the classes in
    proportion to their sizes. A class's share is cut into `blocks_per_class`
    blocks of near-equal size; the class's frame sequence is cut into as many
    equal segments, and each block sits at a random (seeded) place in its own
    segment, so the validation frames cover the whole rotation yet each is
    mostly surrounded by other validation frames, not by near-copies in train.
    Both index tensors are sorted.
    """
    if blocks_per_class < 1:
        raise ValueError(f"val_blocks must be at least 1, got {blocks_per_class}")
    val_count = resolve_split_size(val_size, len(labels), "val_size")
    classes = torch.unique(labels, sorted=True).tolist()
    positions = [torch.nonzero(labels == label).flatten() for label in classes]
    shares = apportion(val_count, [len(class_positions) for class_positions in positions])
    generator = torch.Generator().manual_seed(seed)
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    for label, class_positions, share in zip(classes, positions, shares):
        frames = len(class_positions)
        if share >= frames:
            raise ValueError(f"val_size={val_size!r} leaves class {label} no training samples out of {frames}")
        blocks = min(blocks_per_class, share)
        if blocks == 0:
            continue
        bounds = [block * frames // blocks for block in range(blocks + 1)]
        segment_lengths = [end - start for start, end in zip(bounds, bounds[1:])]
        block_sizes = [share // blocks + (1 if block < share % blocks else 0) for block in range(blocks)]
        # Larger blocks go to longer segments, so every block fits its segment (share < frames).
        segments_by_length = sorted(range(blocks), key=lambda segment: -segment_lengths[segment])
        for segment, block_size in zip(segments_by_length, block_sizes):
            room = segment_lengths[segment] - block_size
            offset = int(torch.randint(0, room + 1, (1,), generator=generator))
            start = bounds[segment] + offset
            is_val[class_positions[start : start + block_size]] = True
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


class FruitAugment(TensorAugment):
    """TensorAugment's flips and rotation, plus a vertical flip and shifts that keep a white border.

    Randomness comes from torch's global generator, as in TensorAugment.
    """

    def __init__(
        self, horizontal_flip: bool = True, vertical_flip: bool = False, max_shift: int = 0, max_rotation_deg: float = 0.0
    ) -> None:
        super().__init__(horizontal_flip=horizontal_flip, max_rotation_deg=max_rotation_deg)
        self.vertical_flip = bool(vertical_flip)
        self.max_shift = int(max_shift)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = super().__call__(images)
        if self.vertical_flip:
            flip = torch.rand(images.shape[0]) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-2), images)
        if self.max_shift > 0:
            # The edge pixels fill in (the photos' white background), not black.
            images = random_crop_with_padding(images, self.max_shift, mode="replicate")
        return images


class FruitsDataModule(ImageClassificationDataModule):
    """Fruit classes (default Carambula, Lychee, Pear) as grayscale `image_size` x `image_size` images.

    Reads the course's layout (`Data_train`/`Data_test`) or Fruits-360's
    (`Training`/`Test`), whichever `data_dir` holds (`layout="auto"`; or name
    one: "course", "fruits-360"). Train images are split into train and a
    `val_size` validation part; test images are the test split. Images are
    converted to gray (an alpha channel is composited onto white, the photos'
    background) and resized with Pillow. Folders of other classes are ignored.

    Validation (`val_split`): the images of a class are consecutive frames of
    one rotating fruit, and neighbouring frames are near-copies. A random
    validation split ("random") therefore holds near-copies of training
    images: on the course data val_acc is 1.0 from the first epoch, says
    nothing about the test set (other rotations) and picks the first epoch's
    checkpoint as "best". The default, "blocks", holds out `val_blocks`
    contiguous runs of frames per class (`frame_block_split`), so most
    validation frames are views the model did not train on, as on the test set.
    A frame looks like its neighbours over some 10-20 frames, so a block must be
    long compared to that: the default, one block of 10% per class (49 of 490
    frames on the course data), puts validation frames as far from their
    nearest training frame as the test frames are (median RMSE 24 vs 25 on a
    0-255 scale; 8 for a random split, 15 for five blocks).

    Augmentation of train batches: `augment` flips horizontally at random;
    `vertical_flip`, `max_shift` (pixels, edges filled from the image's own
    border) and `max_rotation_deg` add more.
    """

    def __init__(
        self,
        data_dir: str | Path = "./data",
        batch_size: int = 32,
        val_size: int | float = 0.1,
        class_names: Sequence[str] = FRUITS_DEFAULT_CLASSES,
        image_size: int = 32,
        augment: bool = False,
        layout: str = "auto",
        val_split: str = "blocks",
        val_blocks: int = 1,
        vertical_flip: bool = False,
        max_shift: int = 0,
        max_rotation_deg: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if layout not in FRUITS_LAYOUT_CHOICES:
            raise ValueError(f"layout must be one of {list(FRUITS_LAYOUT_CHOICES)}, got {layout!r}")
        if val_split not in VAL_SPLITS:
            raise ValueError(f"val_split must be one of {list(VAL_SPLITS)}, got {val_split!r}")
        if val_blocks < 1:
            raise ValueError(f"val_blocks must be at least 1, got {val_blocks}")
        if max_shift < 0 or max_rotation_deg < 0:
            raise ValueError(f"max_shift and max_rotation_deg must be >= 0, got {max_shift} and {max_rotation_deg}")
        any_augment = augment or vertical_flip or max_shift > 0 or max_rotation_deg > 0
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            val_size=val_size,
            augment=FruitAugment(augment, vertical_flip, max_shift, max_rotation_deg) if any_augment else None,
            **kwargs,
        )
        if len(class_names) < 2:
            raise ValueError(f"class_names needs at least two classes, got {list(class_names)}")
        self.save_hyperparameters()
        self.num_classes = len(class_names)
        self.class_names = list(class_names)
        self.image_size = int(image_size)
        self.input_shape = (1, self.image_size, self.image_size)
        self.layout = layout
        self.val_split = val_split
        self.val_blocks = int(val_blocks)

    # -- layout -------------------------------------------------------------

    def detect_layout(self) -> str:
        """The layout `data_dir` holds: "course" or "fruits-360" (`layout`, when not "auto").

        A DataNotFoundError names both layouts when neither train folder is
        there; a ValueError asks to choose when both are, as different folders.
        """
        candidates = FRUITS_LAYOUTS if self.layout == "auto" else {self.layout: FRUITS_LAYOUTS[self.layout]}
        found = {name: find_child_dir(self.data_dir, train) for name, (train, _) in candidates.items()}
        present = {name: folder for name, folder in found.items() if folder is not None}
        if not present:
            raise DataNotFoundError(self._not_found_message())
        if len({folder.resolve() for folder in present.values()}) > 1:
            folders = " and ".join(str(folder) for folder in present.values())
            raise ValueError(
                f"{self.data_dir} holds both fruit layouts ({folders}): choose one with "
                "--data.layout course or --data.layout fruits-360"
            )
        return next(iter(present))

    def _not_found_message(self) -> str:
        layouts = FRUITS_LAYOUTS if self.layout == "auto" else {self.layout: FRUITS_LAYOUTS[self.layout]}
        wanted = " or ".join(f"{self.data_dir / train}" for train, _ in layouts.values())
        message = f"no fruit images: neither {wanted} exists." if len(layouts) > 1 else f"{wanted} not found."
        hint = FRUITS_SOURCE_HINT.format(data_dir=self.data_dir, classes=", ".join(self.class_names))
        return f"{message} {hint}{self._nested_hint()}{unpack_hint(self.data_dir)}"

    def _nested_hint(self) -> str:
        # The course's Data.zip unpacks into a Data/ folder: say so when data_dir is one level too high.
        if not self.data_dir.is_dir():
            return ""
        for child in sorted(self.data_dir.iterdir()):
            if child.is_dir() and any(find_child_dir(child, train) for train, _ in FRUITS_LAYOUTS.values()):
                return f" {child} holds them: pass --data.data_dir {child}."
        return ""

    def _split_dir(self, train: bool) -> Path:
        layout = self.detect_layout()
        name = FRUITS_LAYOUTS[layout][0 if train else 1]
        split_dir = find_child_dir(self.data_dir, name)
        if split_dir is None:
            hint = FRUITS_SOURCE_HINT.format(data_dir=self.data_dir, classes=", ".join(self.class_names))
            raise DataNotFoundError(f"{layout} folder {self.data_dir / name} not found. {hint}")
        return split_dir

    # -- splits -------------------------------------------------------------

    def prepare_files(self) -> None:
        """Check that the train and test folders are present (no automatic download)."""
        self._split_dir(train=True)
        self._split_dir(train=False)

    def _read_split(self, train: bool):
        return read_class_folders(self._split_dir(train), self.class_names, (self.image_size, self.image_size))

    def _load_fit_splits(self):
        images, labels = self._read_split(train=True)
        if self.val_split == "random":
            return self._hold_out_val(images, labels)
        train_index, val_index = frame_block_split(labels, self.val_size, self.val_blocks, self.seed)
        return (images[train_index], labels[train_index]), (images[val_index], labels[val_index])

    def _load_test_split(self):
        return self._read_split(train=False)
