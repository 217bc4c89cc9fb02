"""lightning_hw.nn modules as drop-ins for their torch.nn counterparts."""

import copy

import pytest
import torch
from torch import nn

import lightning_hw
from lightning_hw import nn as lnn


def clone_leaf(t):
    return t.detach().clone().requires_grad_()


def assert_same_forward_backward(ours, theirs, x):
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    x_ours, x_theirs = clone_leaf(x), clone_leaf(x)
    out, expected = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=f"gradient of {name}")


CONV_CONFIGS = [
    dict(in_channels=3, out_channels=8, kernel_size=3),
    dict(in_channels=1, out_channels=8, kernel_size=4),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), bias=False),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding="same", dilation=2, groups=2),
    dict(in_channels=3, out_channels=5, kernel_size=4, padding="same"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="valid"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=(2, 1), padding_mode="replicate"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="circular", stride=2),
    dict(in_channels=3, out_channels=4, kernel_size=2, padding="same", padding_mode="reflect"),
]


@pytest.mark.parametrize("config", CONV_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv2d_loads_torch_state_dict_and_matches(config):
    theirs = nn.Conv2d(**config)
    ours = lnn.Conv2d(**config)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, nn.Conv2d)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, config["in_channels"], 9, 11)
    assert_same_forward_backward(ours, theirs, x)
    # unbatched input, as nn.Conv2d takes it
    assert_same_forward_backward(ours, theirs, x[0])


@pytest.mark.parametrize("config", CONV_CONFIGS[:4], ids=str)
def test_conv2d_has_torch_initialisation(config):
    torch.manual_seed(123)
    theirs = nn.Conv2d(**config)
    torch.manual_seed(123)
    ours = lnn.Conv2d(**config)
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert p.shape == q.shape
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_linear_relu_matches_linear_then_relu():
    theirs = nn.Sequential(nn.Linear(12, 7), nn.ReLU())
    ours = lnn.LinearReLU(12, 7)
    ours.load_state_dict(theirs.state_dict())  # Sequential's "0.weight" keys
    assert_same_forward_backward(ours, theirs, torch.randn(10, 12))

    linear = nn.Linear(12, 7)
    ours.load_state_dict(linear.state_dict())  # nn.Linear's own keys
    assert_same_forward_backward(ours, nn.Sequential(linear, nn.ReLU()), torch.randn(3, 4, 12))
    assert isinstance(ours, nn.Linear)
    assert set(ours.state_dict()) == {"weight", "bias"}


def test_linear_relu_without_bias_and_initialisation():
    torch.manual_seed(7)
    theirs = nn.Linear(9, 5, bias=False)
    torch.manual_seed(7)
    ours = lnn.LinearReLU(9, 5, bias=False)
    assert ours.bias is None
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=0)
    assert_same_forward_backward(ours, nn.Sequential(theirs, nn.ReLU()), torch.randn(6, 9))


def test_modules_in_a_parent_state_dict_and_deepcopy():
    def build(conv, linear):
        return nn.Sequential(conv(1, 4, 3), nn.Flatten(), linear(4 * 6 * 6, 10))

    theirs = build(nn.Conv2d, lambda i, o: nn.Sequential(nn.Linear(i, o), nn.ReLU()))
    ours = build(lnn.Conv2d, lnn.LinearReLU)
    ours.load_state_dict(theirs.state_dict())
    copied = copy.deepcopy(ours)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(copied(x), theirs(x), rtol=1e-4, atol=1e-5)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = lnn.Conv2d(1, 4, 3, padding=1)
        self.hidden = lnn.LinearReLU(4 * 8 * 8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.hidden(torch.relu(self.conv(x)).flatten(1)))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_model_matches_eager(backend):
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.randn(5, 1, 8, 8)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)


def test_has_cuda_kernels_reflects_the_build():
    assert isinstance(lightning_hw.has_cuda_kernels(), bool)
    if torch.version.cuda is None:
        # CUDA kernels can only be built against a torch with CUDA.
        assert lightning_hw.has_cuda_kernels() is False
