"""End to end: one training epoch of the reports' models, built from our ops and
from torch.nn, in one process.

    python benchmarks/bench_train.py                     # all three models, all cores
    python benchmarks/bench_train.py --model fruit --batch-size 64 --rounds 7
    python benchmarks/bench_train.py --model emotion --images 640 --threads 2
    python benchmarks/bench_train.py --precision bf16-mixed   # both under torch.autocast("cpu", bfloat16)

Models (lightning_hw.models, their own forward), each with its default images
per epoch and batch size (--images and --batch-size override them for every
model run):

    fruit     FruitCNN, the fruit report's CNN: Conv2d(1->8, 4x4) -> ReLU ->
              flatten (8*29*29 = 6728) -> Linear+ReLU(841) -> Linear+ReLU(29)
              -> Linear(3) on 1x32x32 images; 1,500 images (the report's data
              size), batch 32.
    twolayer  TwoLayerNet, CIFAR-10's two-layer net: 3072 -> Linear+ReLU(1000)
              -> Linear(10) on 3x32x32 images; 10,000 images, batch 200.
    emotion   EmotionCNN sized for a CPU (configs/fer2013_cnn_small.yaml): five
              3x3 convolution blocks of 32-64-128-256-256 channels with batch
              norm and dropout, FC 256, 7 classes, on 1x48x48 images; 960
              images, batch 64.

The images are generated: only the shapes matter for the time. An epoch is
forward (train mode: batch norm and dropout active), cross-entropy, backward and
an SGD step for every batch; with --precision bf16-mixed (Lightning's name) the
forward and the loss run under torch.autocast("cpu", torch.bfloat16) with float32
weights, as a Lightning run with `--trainer.precision bf16-mixed` does. The torch.nn model is torch_twin of ours: the same
network and weights, with torch.nn's Conv2d and Linear + ReLU in place of our
modules; both compute the same outputs in eval mode before the timing starts.
Rounds alternate torch.nn and ours, and the median epoch of each counts.

For the fruit model a second table compares with the report: its numpy
convolution took 57 s per epoch; the table gives the speedup over it of the
whole epoch and of the convolution layer alone (its forward and backward over
the epoch's batches).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import lightning_hw.nn as lnn
from bench_ops import cpu_flags, cpu_model  # benchmarks/, on sys.path when this file runs as a script
from lightning_hw.models import EmotionCNN, FruitCNN, ImageClassifier, TwoLayerNet

REPORT_SECONDS_PER_EPOCH = 57.0


@dataclass(frozen=True)
class Workload:
    build: Callable[[], ImageClassifier]  # the model on our ops
    images: int  # default images per epoch
    batch_size: int  # default batch size


# Default images: the fruit report's data size; for the others about 1 s (twolayer) and
# 3 s (emotion) per epoch on 2 cores, so that a round is long enough to time steadily.
WORKLOADS = {
    # FruitCNN's defaults are the report's network.
    "fruit": Workload(lambda: FruitCNN(num_classes=3, input_shape=(1, 32, 32)), images=1500, batch_size=32),
    "twolayer": Workload(
        lambda: TwoLayerNet(hidden_size=1000, num_classes=10, input_shape=(3, 32, 32)), images=10_000, batch_size=200
    ),
    "emotion": Workload(
        lambda: EmotionCNN(
            channels=[32, 64, 128, 256, 256], fc_size=256, conv_dropout=0.2, fc_dropout=0.5,
            num_classes=7, input_shape=(1, 48, 48),
        ),  # fmt: skip
        images=960,
        batch_size=64,
    ),
}


def torch_twin(module: nn.Module) -> nn.Module:
    """A deep copy of `module` in which every lightning_hw.nn.Conv2d is a torch.nn.Conv2d
    and every lightning_hw.nn.LinearReLU an nn.Sequential(nn.Linear, nn.ReLU), with
    the same hyper-parameters and (copied) parameters."""
    twin = copy.deepcopy(module)
    _swap_for_torch_modules(twin)
    return twin


def _swap_for_torch_modules(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is lnn.Conv2d:
            twin = nn.Conv2d(
                child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                padding=child.padding, dilation=child.dilation, groups=child.groups,
                bias=child.bias is not None, padding_mode=child.padding_mode,
            )  # fmt: skip
            twin.to(child.weight).load_state_dict(child.state_dict())
        elif type(child) is lnn.LinearReLU:
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            linear.to(child.weight).load_state_dict(child.state_dict())
            twin = nn.Sequential(linear, nn.ReLU())
        elif isinstance(child, (lnn.Conv2d, lnn.LinearReLU)):
            # A subclass computes something else (e.g. TF-'same' padding): a plain twin would differ.
            raise TypeError(f"no torch.nn twin for {type(child).__name__}")
        else:
            _swap_for_torch_modules(child)
            continue
        setattr(module, name, twin)


def assert_same_function(ours: nn.Module, reference: nn.Module, images: torch.Tensor) -> None:
    """Both give the same logits in eval mode (dropout off, batch norm on its running
    statistics), to float32 rounding relative to the largest: TwoLayerNet's are ~1e-5."""
    for model in (ours, reference):
        model.eval()
    with torch.no_grad():
        expected = reference(images)
        torch.testing.assert_close(ours(images), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    for model in (ours, reference):
        model.train()


def make_batches(images: int, batch_size: int, input_shape, classes: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(images, *input_shape, generator=generator)
    y = torch.randint(0, classes, (images,), generator=generator)
    return list(zip(x.split(batch_size), y.split(batch_size)))


# --precision: Lightning's names, and the autocast dtype of each (None: float32 throughout).
PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16}


def autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches, autocast_dtype=None) -> float:
    start = time.perf_counter()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        with autocast(autocast_dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def conv_epoch(conv: nn.Module, batches, autocast_dtype=None) -> float:
    """Forward and backward (weight and bias gradients: the input needs none)
    of the convolution layer alone over the epoch's batches."""
    start = time.perf_counter()
    for x, _ in batches:
        with autocast(autocast_dtype):
            out = conv(x)
        torch.autograd.grad(out, (conv.weight, conv.bias), torch.ones_like(out))
    return time.perf_counter() - start


def median_times(
    models: dict[str, nn.Module], batches, rounds: int, lr: float, time_conv: bool, autocast_dtype=None
):
    """Median seconds per epoch of each model, and with time_conv of its `conv`
    layer alone ({} without); rounds alternate the models."""
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=lr) for name, model in models.items()}
    epoch_times = {name: [] for name in models}
    conv_times = {name: [] for name in models}
    # Warm-up on both batch sizes (a short last batch is a new shape): first-call
    # allocations and our ops' timing of their routes for a new shape stay out.
    warm_up = batches[:1] + batches[-1:]
    for name, model in models.items():
        train_epoch(model, optimizers[name], warm_up, autocast_dtype)
        if time_conv:
            conv_epoch(model.conv, warm_up, autocast_dtype)
    for _ in range(rounds):
        for name, model in models.items():
            epoch_times[name].append(train_epoch(model, optimizers[name], batches, autocast_dtype))
            if time_conv:
                conv_times[name].append(conv_epoch(model.conv, batches, autocast_dtype))
    epoch = {name: statistics.median(times) for name, times in epoch_times.items()}
    conv = {name: statistics.median(times) for name, times in conv_times.items() if times}
    return epoch, conv


def print_table(header, rows) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--images", type=int, help="images per epoch (default: the model's, see above)")
    parser.add_argument("--batch-size", type=int, help="batch size (default: the model's, see above)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median epoch counts")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision", choices=list(PRECISIONS), default="32", help="bf16-mixed: under CPU autocast to bfloat16"
    )
    args = parser.parse_args(argv)
    if any(value is not None and value < 1 for value in (args.images, args.batch_size, args.rounds, args.threads)):
        parser.error("--images, --batch-size, --rounds and --threads must be positive")

    torch.set_num_threads(args.threads)
    # Read before the runs: afterwards the 1-minute average counts this benchmark's own threads.
    print(
        f"# torch {torch.__version__}, {cpu_model()} ({' '.join(cpu_flags())}), {args.threads} threads; "
        f"precision {args.precision}; median of {args.rounds} "
        f"alternating rounds; load average {os.getloadavg()[0]:.2f} (other jobs distort the times)"
    )
    runs = {}  # every model built and checked before any timing, so a refusal comes first
    for name in WORKLOADS if args.model == "all" else [args.model]:
        workload = WORKLOADS[name]
        images = workload.images if args.images is None else args.images
        batch_size = workload.batch_size if args.batch_size is None else args.batch_size
        torch.manual_seed(args.seed)  # the same weights whichever models run
        ours = workload.build()
        if images % batch_size == 1 and any(isinstance(m, nn.BatchNorm1d) for m in ours.modules()):
            parser.error(f"{name}: {images} images in batches of {batch_size} leave a last batch of one image, "
                         "on which batch norm cannot train")  # fmt: skip
        reference = torch_twin(ours)
        batches = make_batches(images, batch_size, ours.input_shape, ours.num_classes, args.seed)
        assert_same_function(ours, reference, batches[0][0])
        runs[name] = {"torch.nn": reference, "lightning_hw": ours}, batches, images, batch_size

    rows, times = [], {}
    for name, (models, batches, images, batch_size) in runs.items():
        epoch, _ = times[name] = median_times(
            models, batches, args.rounds, args.lr, name == "fruit", PRECISIONS[args.precision]
        )
        rows.append((
            name, str(images), str(batch_size), f"{epoch['torch.nn']:.4f}", f"{epoch['lightning_hw']:.4f}",
            f"{epoch['torch.nn'] / epoch['lightning_hw']:.2f}",
        ))  # fmt: skip

    print_table(("model", "images", "batch", "torch.nn s/epoch", "ours s/epoch", "x torch.nn"), rows)
    if "fruit" in times:
        epoch, conv = times["fruit"]
        print(f"\n# fruit against the report's numpy CNN ({REPORT_SECONDS_PER_EPOCH:.0f} s/epoch)")
        print_table(
            ("model", "s/epoch", "x torch.nn", "x report 57 s", "conv s/epoch", "conv x torch", "conv x report"),
            [
                (
                    name,
                    f"{epoch[name]:.4f}",
                    f"{epoch['torch.nn'] / epoch[name]:.2f}",
                    f"{REPORT_SECONDS_PER_EPOCH / epoch[name]:.0f}",
                    f"{conv[name]:.5f}",
                    f"{conv['torch.nn'] / conv[name]:.2f}",
                    f"{REPORT_SECONDS_PER_EPOCH / conv[name]:.0f}",
                )
                for name in epoch
            ],
        )


if __name__ == "__main__":
    main()
