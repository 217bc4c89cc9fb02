"""The reports' models as LightningModules, built on lightning_hw.nn."""

from lightning_hw.models.base import ImageClassifier
from lightning_hw.models.emotion_cnn import EmotionCNN
from lightning_hw.models.fruit_cnn import FruitCNN
from lightning_hw.models.transfer import TransferNet
from lightning_hw.models.two_layer import TwoLayerNet

__all__ = ["EmotionCNN", "FruitCNN", "ImageClassifier", "TransferNet", "TwoLayerNet"]
