"""The reports' LightningModules: architecture, loss, gradients against torch.nn
references, optimisation wiring, checkpoints and a real training run."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from fakes import write_fruits
from lightning_hw.data import FruitsDataModule
from lightning_hw.models import EmotionCNN, FruitCNN, ImageClassifier, TwoLayerNet
from lightning_hw.nn import Conv2d, LinearReLU


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def _random_loader(input_shape, num_classes, count=24, batch_size=8):
    images = torch.randn(count, *input_shape)
    labels = torch.randint(0, num_classes, (count,))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=batch_size)


# -- architectures ------------------------------------------------------------


def test_fruit_cnn_default_is_the_report_network():
    model = FruitCNN(num_classes=3, input_shape=(1, 32, 32))
    assert isinstance(model.conv, Conv2d)
    assert (model.conv.in_channels, model.conv.out_channels, model.conv.kernel_size) == (1, 8, (4, 4))
    widths = [(layer.in_features, layer.out_features) for layer in model.hidden]
    assert widths == [(6728, 841), (841, 29)]
    assert all(isinstance(layer, LinearReLU) for layer in model.hidden)
    assert (model.classifier.in_features, model.classifier.out_features) == (29, 3)
    assert model(torch.rand(5, 1, 32, 32)).shape == (5, 3)
    assert model.first_layer_weights().shape == (8, 1, 4, 4)


def _fruit_cnn_reference(model: FruitCNN) -> nn.Module:
    """The same network from torch.nn modules, sharing copies of the weights."""
    conv = nn.Conv2d(model.conv.in_channels, model.conv.out_channels, model.conv.kernel_size,
                     model.conv.stride, model.conv.padding)  # fmt: skip
    layers: list[nn.Module] = [conv, nn.ReLU(), nn.Flatten()]
    for hidden in model.hidden:
        layers += [nn.Linear(hidden.in_features, hidden.out_features), nn.ReLU()]
    layers.append(nn.Linear(model.classifier.in_features, model.classifier.out_features))
    reference = nn.Sequential(*layers).double()
    ours = [model.conv, *model.hidden, model.classifier]
    theirs = [m for m in reference if isinstance(m, (nn.Conv2d, nn.Linear))]
    for source, target in zip(ours, theirs):
        target.load_state_dict(source.state_dict())
    return reference


@pytest.mark.parametrize("padding", [0, "same"])
def test_fruit_cnn_matches_torch_nn_outputs_and_gradients(padding):
    model = FruitCNN(num_classes=4, input_shape=(2, 12, 10), conv_channels=5, kernel_size=3,
                     padding=padding, hidden_sizes=[17, 9]).double()  # fmt: skip
    reference = _fruit_cnn_reference(model)
    images = torch.randn(6, 2, 12, 10, dtype=torch.float64)
    labels = torch.randint(0, 4, (6,))
    F.cross_entropy(model(images), labels).backward()
    F.cross_entropy(reference(images), labels).backward()
    torch.testing.assert_close(model(images), reference(images))
    ours = [model.conv, *model.hidden, model.classifier]
    theirs = [m for m in reference if isinstance(m, (nn.Conv2d, nn.Linear))]
    for mine, ref in zip(ours, theirs):
        torch.testing.assert_close(mine.weight.grad, ref.weight.grad)
        torch.testing.assert_close(mine.bias.grad, ref.bias.grad)


def test_two_layer_net_loss_is_cross_entropy_plus_l2_and_gradients_match():
    torch.manual_seed(0)
    model = TwoLayerNet(num_classes=5, input_shape=(3, 4, 4), hidden_size=7, reg=0.3, init_std=None).double()
    images = torch.randn(9, 3, 4, 4, dtype=torch.float64)
    labels = torch.randint(0, 5, (9,))
    w1 = model.hidden.weight.detach().clone().requires_grad_()
    b1 = model.hidden.bias.detach().clone().requires_grad_()
    w2 = model.classifier.weight.detach().clone().requires_grad_()
    b2 = model.classifier.bias.detach().clone().requires_grad_()
    logits = F.linear(torch.relu(F.linear(images.flatten(1), w1, b1)), w2, b2)
    expected = F.cross_entropy(logits, labels) + 0.3 * (w1.square().sum() + w2.square().sum())
    loss, data_loss = model._loss(model(images), labels)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(data_loss, F.cross_entropy(logits, labels))
    loss.backward()
    expected.backward()
    for param, ref in ((model.hidden.weight, w1), (model.hidden.bias, b1),
                       (model.classifier.weight, w2), (model.classifier.bias, b2)):  # fmt: skip
        torch.testing.assert_close(param.grad, ref.grad)


def test_two_layer_net_report_initialisation_and_templates():
    model = TwoLayerNet(num_classes=10, input_shape=(3, 32, 32), hidden_size=36, init_std=1e-4)
    assert isinstance(model.hidden, LinearReLU)
    assert model.hidden.weight.std().item() == pytest.approx(1e-4, rel=0.05)
    assert torch.count_nonzero(model.hidden.bias) == 0 and torch.count_nonzero(model.classifier.bias) == 0
    templates = model.first_layer_weights()
    assert templates.shape == (36, 3, 32, 32)
    torch.testing.assert_close(templates[3].flatten(), model.hidden.weight[3].detach())
    assert model.regularization() is None  # reg defaults to 0: no penalty term


def test_emotion_cnn_report_and_small_variants():
    report = EmotionCNN(num_classes=7, input_shape=(1, 48, 48))
    convs = [m for m in report.features if isinstance(m, nn.Conv2d)]
    assert all(isinstance(conv, Conv2d) for conv in convs)
    assert [conv.out_channels for conv in convs] == [256, 512, 512, 256, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in report.features) == 5
    assert report.head[1].out_features == 256 and report.head[-1].out_features == 7
    small = EmotionCNN(num_classes=7, input_shape=(1, 48, 48), channels=[4, 8, 8], fc_size=16)
    images = torch.randn(3, 1, 48, 48)
    logits = small(images)
    assert logits.shape == (3, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in small.parameters())
    assert small.first_layer_weights().shape == (4, 1, 3, 3)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: EmotionCNN(num_classes=7, input_shape=(1, 8, 8)), "too small"),
        (lambda: FruitCNN(num_classes=3, input_shape=(1, 3, 3), kernel_size=4), "kernel size|input size|Calculated"),
        (lambda: FruitCNN(num_classes=3, input_shape=(1024,)), r"\(C, H, W\)"),
        (lambda: TwoLayerNet(num_classes=1, input_shape=(4,)), "num_classes"),
        (lambda: TwoLayerNet(num_classes=3, input_shape=(4,), hidden_size=0), "hidden_size"),
        (lambda: TwoLayerNet(num_classes=3, input_shape=(4,), reg=-1.0), "reg"),
        (lambda: TwoLayerNet(num_classes=3, input_shape=(4,), class_names=["a"]), "class_names"),
    ],
)
def test_bad_model_arguments_raise_clear_errors(build, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        build()


# -- Lightning wiring ------------------------------------------------------------


def test_predict_step_returns_class_probabilities():
    model = TwoLayerNet(num_classes=4, input_shape=(6,), hidden_size=5, init_std=None)
    images = torch.randn(7, 6)
    probabilities = model.predict_step((images, torch.zeros(7)), 0)
    assert probabilities.dtype == torch.float32 and probabilities.shape == (7, 4)
    torch.testing.assert_close(probabilities, torch.softmax(model(images).double(), 1).float())
    torch.testing.assert_close(probabilities.sum(1), torch.ones(7))


def test_sgd_learning_rate_decays_once_per_epoch(tmp_path):
    model = TwoLayerNet(
        num_classes=3,
        input_shape=(5,),
        hidden_size=4,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9),
    )
    trainer = _trainer(tmp_path, max_epochs=3, limit_val_batches=0)
    trainer.fit(model, _random_loader((5,), 3))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5 * 0.9**3)


def test_metrics_confusion_matrix_and_per_class_accuracy(tmp_path):
    model = FruitCNN(num_classes=3, input_shape=(1, 8, 8), conv_channels=2, kernel_size=3, hidden_sizes=[6],
                     class_names=["a", "b", "c"])  # fmt: skip
    loader = _random_loader((1, 8, 8), 3, count=20, batch_size=6)
    trainer = _trainer(tmp_path)
    results = trainer.test(model, loader, verbose=False)[0]
    matrix = model.confusion_matrices["test"]
    assert matrix.shape == (3, 3) and matrix.sum() == 20
    labels = torch.cat([y for _, y in loader])
    predicted = torch.cat([model(x).argmax(1) for x, _ in loader])
    assert results["test_acc"] == pytest.approx((predicted == labels).double().mean().item())
    torch.testing.assert_close(matrix.sum(1), torch.bincount(labels, minlength=3))
    for index, name in enumerate(["a", "b", "c"]):
        chosen = labels == index
        expected = (predicted[chosen] == index).double().mean().item() if chosen.any() else 0.0
        assert results[f"test_acc_class/{name}"] == pytest.approx(expected)


def test_checkpoint_loads_with_weights_only(tmp_path):
    model = FruitCNN(num_classes=3, input_shape=(1, 8, 8), conv_channels=2, kernel_size=3, hidden_sizes=[6])
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=True, limit_val_batches=0)
    trainer.fit(model, _random_loader((1, 8, 8), 3))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    restored = FruitCNN.load_from_checkpoint(path, weights_only=True)
    assert checkpoint["hyper_parameters"]["hidden_sizes"] == [6]
    images = torch.rand(4, 1, 8, 8)
    model.eval()
    restored.eval()
    torch.testing.assert_close(restored(images), model(images))


def test_fruit_cnn_learns_a_separable_task(tmp_path):
    """The report's network reaches over 90% on generated fruit images within a few epochs."""
    pl.seed_everything(0)
    data = FruitsDataModule(
        write_fruits(tmp_path / "fruits", n_train=60, n_test=20, size=32), batch_size=16, normalize="per_channel"
    )
    model = FruitCNN(num_classes=3, input_shape=(1, 32, 32),
                     optimizer=lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9))  # fmt: skip
    trainer = _trainer(tmp_path, max_epochs=4)
    trainer.fit(model, datamodule=data)
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"]
    assert accuracy > 0.9
