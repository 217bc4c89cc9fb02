"""NaN and infinity: inputs holding them propagate through our ops (every route forced where it
applies) and models as through torch.nn, and training stops with a clear message when the loss
stops being finite."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hw import ops
from lightning_hw.callbacks import FiniteLossCheck, NonFiniteLossError
from lightning_hw.cli import main
from lightning_hw.models import EmotionCNN, FruitCNN, TwoLayerNet
from lightning_hw.nn import Conv2d, LinearReLU
from routes import (
    LINEAR_PARTS,
    LINEAR_ROUTES,
    OUR_CONV_ROUTES,
    conv2d_runnable,
    forced_route,
    linear_relu_runnable,
    with_routes,
)

SPECIAL_VALUES = (math.nan, math.inf, -math.inf)


def poisoned(shape, dtype, count: int) -> torch.Tensor:
    """Random values with `count` NaN / +inf / -inf entries at random places."""
    values = torch.randn(shape, dtype=dtype)
    flat = values.view(-1)
    places = torch.randperm(flat.numel())[:count]
    flat[places] = torch.tensor(SPECIAL_VALUES, dtype=dtype)[torch.arange(len(places)) % 3]
    return values


def assert_same_nonfinite_pattern(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """NaN, +inf and -inf at exactly the same places; the finite values close."""
    assert torch.equal(ours.isnan(), reference.isnan()), "NaN positions differ"
    assert torch.equal(ours.isposinf(), reference.isposinf()), "+inf positions differ"
    assert torch.equal(ours.isneginf(), reference.isneginf()), "-inf positions differ"
    finite = reference.isfinite()
    tolerance = 1e-9 if reference.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(ours[finite], reference[finite], rtol=tolerance, atol=tolerance)


# -- the ops, every route forced on the shapes it runs (tests/routes.py) ---------------------


@pytest.mark.kernel_grid
@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, dilation, groups, dtype, route",
    with_routes(
        [
            pytest.param((4, 1, 20, 20), (8, 1, 4, 4), 1, 0, 1, 1, id="one-input-channel"),
            pytest.param((3, 3, 16, 16), (32, 3, 3, 3), 1, 1, 1, 1, id="few-input-channels"),
            pytest.param((2, 32, 10, 10), (32, 32, 3, 3), 1, "same", 1, 1, id="many-channels"),
            pytest.param((2, 8, 11, 11), (8, 1, 3, 3), 1, 1, 1, 8, id="depthwise"),
            pytest.param((2, 4, 13, 13), (6, 4, 3, 3), 2, 1, 1, 1, id="strided"),
            pytest.param((2, 4, 13, 13), (6, 4, 3, 3), 1, 0, 2, 1, id="dilated"),
        ],
        conv2d_runnable,
        OUR_CONV_ROUTES,
    ),
)
def test_conv2d_propagates_nan_and_inf_inputs_like_torch(input_shape, weight_shape, stride, padding, dilation, groups,
                                                         dtype, route):  # fmt: skip
    images = poisoned(input_shape, dtype, count=6)
    weight = torch.randn(weight_shape, dtype=dtype)
    bias = torch.randn(weight_shape[0], dtype=dtype)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    with forced_route(route) as ran:
        ours = ops.conv2d(images, weight, bias, **options)
    ran.assert_only(route, ["conv2d_forward"])
    assert_same_nonfinite_pattern(ours, F.conv2d(images, weight, bias, **options))


def _linear_runnable(rows, in_features, out_features, dtype, routes):
    return linear_relu_runnable((rows, in_features), out_features, dtype, routes)


def _linear_shapes(shapes):
    return [pytest.param(*shape, id="x".join(map(str, shape))) for shape in shapes]


@pytest.mark.kernel_grid
@pytest.mark.parametrize(
    "rows, in_features, out_features, dtype, route",
    with_routes(_linear_shapes([(5, 7, 6), (32, 1500, 300), (256, 841, 29), (200, 700, 900), (3, 64, 10)]),
                _linear_runnable, LINEAR_ROUTES),
)  # fmt: skip
def test_linear_relu_propagates_nan_and_inf_inputs_like_torch(rows, in_features, out_features, dtype, route):
    inputs = poisoned((rows, in_features), dtype, count=5)
    weight = torch.randn(out_features, in_features, dtype=dtype) / math.sqrt(in_features)
    bias = torch.randn(out_features, dtype=dtype)
    reference = torch.relu(F.linear(inputs, weight, bias))
    with forced_route(route) as ran:
        ours = ops.linear_relu(inputs, weight, bias)
    ran.assert_only(route, LINEAR_PARTS[:1])
    assert_same_nonfinite_pattern(ours, reference)


@pytest.mark.kernel_grid
@pytest.mark.parametrize(
    "rows, in_features, out_features, dtype, route",
    with_routes(_linear_shapes([(5, 7, 6), (32, 1500, 300), (256, 841, 29)]), _linear_runnable, LINEAR_ROUTES),
)
def test_linear_relu_gradients_through_nan_outputs_match_torch(rows, in_features, out_features, dtype, route):
    # torch's ReLU backward zeroes the gradient where output <= 0 only, so a NaN output passes it on.
    inputs = poisoned((rows, in_features), dtype, count=3).requires_grad_()
    weight = (torch.randn(out_features, in_features, dtype=dtype) / math.sqrt(in_features)).requires_grad_()
    bias = torch.randn(out_features, dtype=dtype, requires_grad=True)
    grad_output = torch.randn(rows, out_features, dtype=dtype)
    with forced_route(route) as ran:
        ours = torch.autograd.grad(ops.linear_relu(inputs, weight, bias), (inputs, weight, bias), grad_output)
    ran.assert_only(route, LINEAR_PARTS)
    reference = torch.autograd.grad(torch.relu(F.linear(inputs, weight, bias)), (inputs, weight, bias), grad_output)
    for mine, theirs in zip(ours, reference):
        assert_same_nonfinite_pattern(mine, theirs)


# -- the models against the same network built from torch.nn -------------------------------


def torch_nn_twin(model: nn.Module) -> nn.Module:
    """A copy of `model` with each of our modules swapped for its torch.nn original, same weights."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LinearReLU):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, dtype=child.weight.dtype)
                linear.load_state_dict(child.state_dict())
                setattr(parent, name, nn.Sequential(linear, nn.ReLU()))
            elif isinstance(child, Conv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                 child.dilation, child.groups, child.bias is not None, child.padding_mode,
                                 dtype=child.weight.dtype)  # fmt: skip
                conv.load_state_dict(child.state_dict())
                setattr(parent, name, conv)
    assert not any(isinstance(m, (LinearReLU, Conv2d)) for m in twin.modules())
    return twin


MODELS = {
    "fruit_cnn": lambda: FruitCNN(num_classes=3, input_shape=(1, 16, 16), conv_channels=6, hidden_sizes=[40, 12]),
    "fruit_cnn_same": lambda: FruitCNN(num_classes=10, input_shape=(1, 8, 8), conv_channels=16, kernel_size=3,
                                       padding=1, hidden_sizes=[128]),  # fmt: skip
    "two_layer": lambda: TwoLayerNet(num_classes=10, input_shape=(3, 8, 8), hidden_size=50, init_std=None),
    "emotion_cnn": lambda: EmotionCNN(num_classes=7, input_shape=(1, 16, 16), channels=[8, 16], fc_size=12),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_output_on_nan_and_inf_images_matches_torch_nn(name, dtype):
    model = MODELS[name]().to(dtype).eval()
    twin = torch_nn_twin(model)
    images = torch.rand(7, *model.input_shape, dtype=dtype)
    images[1].view(-1)[torch.randint(images[1].numel(), (1,))] = math.nan  # one NaN pixel
    images[2].view(-1)[torch.randint(images[2].numel(), (1,))] = math.inf  # one +inf pixel
    images[3].view(-1)[torch.randint(images[3].numel(), (1,))] = -math.inf  # one -inf pixel
    images[4] = math.nan
    images[5] = math.inf
    images[6] = poisoned(images[6].shape, dtype, count=4)  # a mix
    with torch.no_grad():
        ours, reference = model(images), twin(images)
    assert_same_nonfinite_pattern(ours, reference)
    # Each sample is computed on its own: the clean image stays finite (nothing leaks across the batch).
    assert ours[0].isfinite().all()
    assert ours[4].isnan().all() and ours[5].isnan().all()


# -- training stops on a non-finite loss ----------------------------------------------------------


class LossTurnsNonFinite(pl.LightningModule):
    """A linear regression whose loss is replaced by `value` from global step `bad_step` on."""

    def __init__(self, bad_step: int, value: float) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.bad_step = bad_step
        self.value = value
        self.weights_seen: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        self.weights_seen[self.global_step] = self.layer.weight.detach().clone()
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        if self.global_step >= self.bad_step:
            loss = loss * self.value if math.isnan(self.value) else loss + self.value
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("value", SPECIAL_VALUES, ids=["nan", "inf", "-inf"])
def test_finite_loss_check_stops_before_the_bad_step_is_applied(value, tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(40, 3), torch.randn(40, 1))
    model = LossTurnsNonFinite(bad_step=7, value=value)
    trainer = pl.Trainer(
        max_epochs=5, callbacks=[FiniteLossCheck()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    message = str(error.value)
    # 10 batches per epoch: global step 7 is epoch 0, batch 7.
    assert f"not finite ({value})" in message and "epoch 0, global step 7, batch 7 of the epoch" in message
    assert "lower the learning rate" in message and "No checkpoint was written yet" in message
    assert trainer.global_step == 7  # the bad step was never taken
    torch.testing.assert_close(model.layer.weight.detach(), model.weights_seen[7], rtol=0, atol=0)
    assert all(parameter.isfinite().all() for parameter in model.parameters())


def test_diverging_cli_run_exits_with_the_message_and_keeps_its_checkpoint(tmp_path, capsys):
    # Epoch 0 trains at lr 0.002; the scheduler then multiplies it by 1e30 and epoch 1 diverges.
    args = ["fit", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=3",
            "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1",
            "--model.lr_scheduler=torch.optim.lr_scheduler.ExponentialLR",
            "--model.lr_scheduler.init_args.gamma=1e30"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    printed = capsys.readouterr()
    message = printed.err.strip().splitlines()[-1]
    assert message.startswith("error: training stopped: the training loss is not finite")
    assert "at epoch 1, global step " in message and "lower the learning rate" in message
    assert "test accuracy" not in printed.out  # the failed run is not tested
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"The last checkpoint written is {last}." in message
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 4
    assert all(value.isfinite().all() for value in checkpoint["state_dict"].values() if value.is_floating_point())
