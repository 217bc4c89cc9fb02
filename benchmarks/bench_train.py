"""End to end: one training epoch of the fruit report's CNN, built from our ops
and from torch.nn, in one process.

    python benchmarks/bench_train.py                     # 1,500 images, batch 32, 2 threads
    python benchmarks/bench_train.py --batch-size 64 --rounds 7

The model is the report's: Conv2d(1->8, 4x4) -> ReLU -> flatten (8*29*29 = 6728)
-> Linear+ReLU(841) -> Linear+ReLU(29) -> Linear(3), on 32x32 grayscale images
(generated: only the shapes matter for the time). An epoch is forward,
cross-entropy, backward and an SGD step for every batch. Both models start from
the same weights; rounds alternate torch.nn and ours, and the median epoch of
each counts. The report's numpy convolution took 57 s per epoch; the table
gives the speedup over it of the whole epoch and of the convolution layer alone
(its forward and backward over the epoch's batches).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import lightning_hw.nn as lnn

REPORT_SECONDS_PER_EPOCH = 57.0
IMAGE_SIZE = 32
CLASSES = 3


class FruitCNN(nn.Module):
    """The report's CNN from either family of layers (same parameter names, so
    one state_dict loads into both: LinearReLU accepts the Sequential keys)."""

    def __init__(self, ours: bool):
        super().__init__()
        conv_out = IMAGE_SIZE - 4 + 1
        if ours:
            self.conv = lnn.Conv2d(1, 8, 4)
            self.fc1 = lnn.LinearReLU(8 * conv_out * conv_out, 841)
            self.fc2 = lnn.LinearReLU(841, 29)
        else:
            self.conv = nn.Conv2d(1, 8, 4)
            self.fc1 = nn.Sequential(nn.Linear(8 * conv_out * conv_out, 841), nn.ReLU())
            self.fc2 = nn.Sequential(nn.Linear(841, 29), nn.ReLU())
        self.fc3 = nn.Linear(29, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc3(self.fc2(self.fc1(x)))


def make_batches(images: int, batch_size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(images, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    y = torch.randint(0, CLASSES, (images,), generator=generator)
    return list(zip(x.split(batch_size), y.split(batch_size)))


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches) -> float:
    start = time.perf_counter()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return time.perf_counter() - start


def conv_epoch(conv: nn.Module, batches) -> float:
    """Forward and backward (weight and bias gradients: the input needs none)
    of the convolution layer alone over the epoch's batches."""
    start = time.perf_counter()
    for x, _ in batches:
        out = conv(x)
        torch.autograd.grad(out, (conv.weight, conv.bias), torch.ones_like(out))
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500, help="images per epoch (the report's data size)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median epoch counts")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--images, --batch-size, --rounds and --threads must be positive")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    reference = FruitCNN(ours=False)
    ours = FruitCNN(ours=True)
    ours.load_state_dict(reference.state_dict())
    batches = make_batches(args.images, args.batch_size, args.seed)
    with torch.no_grad():  # same weights, same function
        torch.testing.assert_close(ours(batches[0][0]), reference(batches[0][0]), rtol=1e-4, atol=1e-4)

    models = {"torch.nn": reference, "lightning_hw": ours}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=args.lr) for name, m in models.items()}
    epoch_times = {name: [] for name in models}
    conv_times = {name: [] for name in models}
    for name, model in models.items():  # warm-up: first-call allocations stay out
        train_epoch(model, optimizers[name], batches[:2])
        conv_epoch(model.conv, batches[:2])
    for _ in range(args.rounds):
        for name, model in models.items():
            epoch_times[name].append(train_epoch(model, optimizers[name], batches))
            conv_times[name].append(conv_epoch(model.conv, batches))

    epoch = {name: statistics.median(t) for name, t in epoch_times.items()}
    conv = {name: statistics.median(t) for name, t in conv_times.items()}
    print(
        f"# torch {torch.__version__}, {args.threads} threads; {args.images} images 1x32x32, "
        f"batch {args.batch_size} ({len(batches)} steps); median of {args.rounds} alternating rounds; "
        f"load average {os.getloadavg()[0]:.2f} (other jobs distort the times)"
    )
    header = ("model", "s/epoch", "x torch.nn", "x report 57 s", "conv s/epoch", "conv x torch", "conv x report")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in models:
        cells = (
            name,
            f"{epoch[name]:.4f}",
            f"{epoch['torch.nn'] / epoch[name]:.2f}",
            f"{REPORT_SECONDS_PER_EPOCH / epoch[name]:.0f}",
            f"{conv[name]:.5f}",
            f"{conv['torch.nn'] / conv[name]:.2f}",
            f"{REPORT_SECONDS_PER_EPOCH / conv[name]:.0f}",
        )
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
