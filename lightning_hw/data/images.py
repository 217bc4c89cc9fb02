"""Reading image files: one file as uint8 (C, H, W) at a data set's size and channels
(`load_image`), the class folders of a training split, and every image under a folder for
prediction; plus the folder helpers the data sets share."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from pytorch_lightning.utilities import rank_zero_warn

from lightning_hw.data.errors import DataFormatError, DataNotFoundError

# The image files read from folders (training splits and prediction).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# load_image's uint8 values times this are the [0, 1] images that models (and exported ones) take.
PIXEL_SCALE_8BIT = 1.0 / 255.0
# How load_image resizes to a data set's size.
RESIZE_FILTER = Image.Resampling.BILINEAR


def load_image(path: Path, size: tuple[int, int], channels: int = 1) -> np.ndarray:
    """Read an image file as uint8 (channels, H, W), resized to `size` (height, width) if needed.

    One channel is gray, three are RGB. Any mode Pillow reads is converted:
    palette, 16-bit gray (scaled to 8 bits), CMYK; an alpha channel is
    composited onto white. A JPEG's EXIF orientation is applied and an
    animated image gives its first frame. Whatever stops the file from
    decoding is a DataFormatError that names it.
    """
    mode = _pillow_mode(channels)
    height, width = size
    try:
        with Image.open(path) as opened:
            # A JPEG decodes at a reduced scale that still covers the target size (either orientation).
            opened.draft(mode, (max(size), max(size)))
            image = ImageOps.exif_transpose(opened)
            image = _to_mode(image, mode)
            if image.size != (width, height):
                image = image.resize((width, height), RESIZE_FILTER)
            array = np.asarray(image, dtype=np.uint8)
    except Exception as error:  # any decoder failure means the same: this file cannot be used
        raise DataFormatError(f"cannot read image {path}: {error}. Replace or delete the file.") from error
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def image_reading_rule(size: tuple[int, int], channels: int) -> dict[str, str]:
    """`load_image`'s steps for images of `size` (height, width) and `channels`, in words: the
    metadata of an exported model, whose users read image files without lightning_hw."""
    height, width = size
    mode = _pillow_mode(channels)
    return {
        "color": (
            f"Pillow mode {mode} ({'gray' if mode == 'L' else 'RGB'}): opened with Image.draft('{mode}', "
            f"({max(size)}, {max(size)})) (a JPEG decodes at a reduced scale), EXIF orientation applied "
            "(ImageOps.exif_transpose), 16-bit gray scaled to 8 bits, an alpha channel (or a palette's "
            f"transparency) composited onto white, then Image.convert('{mode}')"
        ),
        "resize": (
            f"the whole image to {width}x{height} (width x height; the aspect ratio is not kept) with "
            f"Image.resize(({width}, {height}), Image.Resampling.{RESIZE_FILTER.name}); an image of that size as it is"
        ),
        "value_range": "float32 in [0, 1]: the 8-bit pixel values times 1/255",
    }


def _pillow_mode(channels: int) -> str:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels}")
    return "L" if channels == 1 else "RGB"


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

