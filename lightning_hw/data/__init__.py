"""LightningDataModules for the course data sets: CIFAR-10, FER2013, Fruits-360 and the bundled digits.

One module per data set, and shared modules by concern: `errors`, `images` (reading image
files), `preprocessing` (scaling and normalisation), `splits` (splits and samplers),
`augmentation`, and `base` (the base DataModule).
"""

from lightning_hw.data.base import ImageClassificationDataModule
from lightning_hw.data.cifar10 import CIFAR10DataModule
from lightning_hw.data.digits import DigitsDataModule
from lightning_hw.data.errors import DataFormatError, DataNotFoundError
from lightning_hw.data.fer2013 import FER2013DataModule
from lightning_hw.data.fruits import FruitsDataModule

__all__ = [
    "CIFAR10DataModule",
    "DataFormatError",
    "DataNotFoundError",
    "DigitsDataModule",
    "FER2013DataModule",
    "FruitsDataModule",
    "ImageClassificationDataModule",
]
