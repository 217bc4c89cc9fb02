"""Report 000's transfer learning (Xception / ResNet50 heads, 86.7% on CIFAR-10):
a torchvision backbone with its classifier replaced by our head.

torchvision is an optional dependency, imported when a TransferNet is built
(`pip install torchvision` with the torchvision release that pairs with the
installed torch; `make install` does that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import nn

from lightning_hw.models.base import ImageClassifier
from lightning_hw.nn import Conv2d, LinearReLU


def import_torchvision():
    """torchvision, or an ImportError that says why it is missing or does not load."""
    release = torch.__version__.split("+")[0]
    advice = (
        f"install the torchvision built for torch {release} with `pip install torchvision -c constraints.txt`, "
        f"constraints.txt holding torch=={release} (make install does this); PyPI's torchvision wheels are CUDA "
        "builds, so a CPU-only torch needs the +cpu torchvision wheel from PyTorch's own wheel index"
    )
    try:
        import torchvision
    except ImportError as error:
        raise ImportError(f"TransferNet needs torchvision: {advice}") from error
    except Exception as error:  # a wheel built for another torch fails while registering its ops
        raise ImportError(f"torchvision does not load with torch {torch.__version__} ({error}): {advice}") from error
    return torchvision


def use_our_ops(module: nn.Module) -> None:
    """Swap, below `module`, every torch.nn.Conv2d for lightning_hw.nn.Conv2d and every
    Linear followed by ReLU in a Sequential for LinearReLU (the ReLU's place becomes an
    Identity, so state_dict keys stay those of the torch network); weights kept."""
    children = list(module.named_children())
    for index, (name, child) in enumerate(children):
        if type(child) is nn.Conv2d:
            ours = Conv2d(
                child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                padding=child.padding, dilation=child.dilation, groups=child.groups,
                bias=child.bias is not None, padding_mode=child.padding_mode,
            )  # fmt: skip
        elif (
            isinstance(module, nn.Sequential)
            and type(child) is nn.Linear
            and index + 1 < len(children)
            and type(children[index + 1][1]) is nn.ReLU
        ):
            ours = LinearReLU(child.in_features, child.out_features, bias=child.bias is not None)
            setattr(module, children[index + 1][0], nn.Identity())
        else:
            use_our_ops(child)
            continue
        ours.to(child.weight).load_state_dict(child.state_dict())  # the child's dtype and device too
        setattr(module, name, ours)


def _cut_classifier(backbone: nn.Module, name: str) -> int:
    """Replace the backbone's last Linear (its ImageNet classifier) by Identity; return its input width."""
    linears = [(path, module) for path, module in backbone.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"backbone {name!r} has no Linear classifier to replace")
    path, last = linears[-1]
    parent_path, _, attribute = path.rpartition(".")
    setattr(backbone.get_submodule(parent_path), attribute, nn.Identity())
    return last.in_features


class TransferNet(ImageClassifier):
    """A torchvision classification backbone, its classifier cut off, under a new head:
    [LinearReLU(hidden) -> Dropout] * len(hidden_sizes) -> Linear(num_classes).

    Inputs are resized to `image_size` (bilinear) and grayscale inputs repeated
    to 3 channels. The backbone trains with the head, or stays frozen
    (`freeze_backbone`: no gradients, eval mode so batch-norm statistics stay
    put) for good or for the first `unfreeze_after_epochs` epochs (report 000
    found fine-tuning the backbone necessary). A backbone frozen for good is
    left out of the optimizer; one unfrozen later is in it from the start, and
    optimizers skip its parameters while they have no gradients.

    Args:
        backbone: a torchvision classification model name (resnet50, resnet18,
            efficientnet_b0, convnext_tiny, ...).
        pretrained: true: torchvision's default ImageNet weights (downloaded
            once into torch.hub's cache; a clear error without network); a
            path: a state_dict file of the torchvision model (e.g. that
            download, brought to a machine without network); false: random.
        image_size: side of the square input the backbone sees; None keeps the data's size.
        hidden_sizes: widths of the head's Linear+ReLU layers.
        dropout: dropout after each of them.
        freeze_backbone: do not train the backbone (see above).
        unfreeze_after_epochs: with freeze_backbone, train the backbone from this epoch on.
        our_ops: run the backbone's convolutions and Linear+ReLU pairs on
            lightning_hw's ops (False: torch's own kernels).
        **kwargs: ImageClassifier's arguments (num_classes, input_shape, optimizer, ...).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained: bool | str = False,
        image_size: int | None = 224,
        hidden_sizes: Sequence[int] = (256,),
        dropout: float = 0.0,
        freeze_backbone: bool = False,
        unfreeze_after_epochs: int | None = None,
        our_ops: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if len(self.input_shape) != 3 or self.input_shape[0] not in (1, 3):
            raise ValueError(f"TransferNet needs RGB or grayscale images (C, H, W), got input_shape {self.input_shape}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be positive or None, got {image_size}")
        if any(size < 1 for size in hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive, got {list(hidden_sizes)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if unfreeze_after_epochs is not None and (not freeze_backbone or unfreeze_after_epochs < 1):
            raise ValueError(
                f"unfreeze_after_epochs={unfreeze_after_epochs} needs freeze_backbone=true and a value >= 1"
            )
        self.image_size = image_size
        self.freeze_backbone = freeze_backbone
        self.unfreeze_after_epochs = unfreeze_after_epochs
        self.backbone = self._build_backbone(backbone, pretrained)
        features = _cut_classifier(self.backbone, backbone)
        if our_ops:
            use_our_ops(self.backbone)
        layers: list[nn.Module] = []
        width = features
        for hidden in hidden_sizes:
            layers.append(LinearReLU(width, hidden))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, self.num_classes))
        self.head = nn.Sequential(*layers)
        self.backbone_frozen = False
        self._set_backbone_frozen(freeze_backbone)
        # The base class builds the optimizer from self.parameters(): route it through the rule above.
        self._given_optimizer_factory = self.optimizer_factory
        self.optimizer_factory = self._build_optimizer

    @staticmethod
    def _build_backbone(name: str, pretrained: bool | str) -> nn.Module:
        torchvision = import_torchvision()
        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            raise ValueError(
                f"backbone must be a torchvision classification model ({', '.join(available)}), got {name!r}"
            )
        if isinstance(pretrained, str):
            backbone = torchvision.models.get_model(name, weights=None)
            backbone.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
            return backbone
        weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
        try:
            return torchvision.models.get_model(name, weights=weights)
        except (URLError, ConnectionError, TimeoutError) as error:
            raise RuntimeError(
                f"could not download the pretrained weights of {name} from {weights.url} ({error}). "
                f"Without network, put that file into {torch.hub.get_dir()}/checkpoints/ or give its path as "
                "pretrained, or set pretrained: false"
            ) from error

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> TransferNet:
        # The checkpoint holds every weight: no pretrained weights to fetch first.
        kwargs.setdefault("pretrained", False)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def _set_backbone_frozen(self, frozen: bool) -> None:
        self.backbone_frozen = frozen
        self.backbone.requires_grad_(not frozen)
        self.backbone.train(self.training and not frozen)

    def _build_optimizer(self, parameters):
        if self.freeze_backbone and self.unfreeze_after_epochs is None:
            parameters = self.head.parameters()
        return self._given_optimizer_factory(parameters)

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def on_train_epoch_start(self) -> None:
        if self.backbone_frozen and self.unfreeze_after_epochs is not None:
            if self.current_epoch >= self.unfreeze_after_epochs:
                self._set_backbone_frozen(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.reshape(-1, *self.input_shape)  # the data module may flatten
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        size = (self.image_size, self.image_size)
        if self.image_size is not None and images.shape[-2:] != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            features = self.backbone(images)
        return self.head(features.flatten(1))

    def first_layer_weights(self) -> torch.Tensor:
        first = next(module for module in self.backbone.modules() if isinstance(module, nn.Conv2d))
        return first.weight.detach().cpu()
