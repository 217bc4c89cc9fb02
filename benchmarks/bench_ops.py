"""Micro-benchmarks: lightning_hw ops against PyTorch's own kernels, in one process.

    python benchmarks/bench_ops.py                  # CPU, 2 threads, all shapes
    python benchmarks/bench_ops.py --device cuda    # GPU (TF32 off unless --tf32)
    python benchmarks/bench_ops.py --only conv --markdown
    python benchmarks/bench_ops.py --only backbone  # EfficientNet-Lite0's depthwise/pointwise convs

Prints medians of torch.utils.benchmark (forward, and forward+backward computing
every gradient), the best of several rounds that alternate torch and ours, and
the ratio torch/ours: above 1 means ours is faster.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from lightning_hw import ops


@dataclass(frozen=True)
class ConvCase:
    name: str
    batch: int
    in_channels: int
    out_channels: int
    kernel: int
    size: int
    padding: int
    stride: int = 1
    groups: int = 1

    def flops(self) -> float:
        out = (self.size + 2 * self.padding - self.kernel) // self.stride + 1
        per_output = (self.in_channels // self.groups) * self.kernel**2
        return 2.0 * self.batch * self.out_channels * out * out * per_output


@dataclass(frozen=True)
class LinearCase:
    name: str
    batch: int
    in_features: int
    out_features: int

    def flops(self) -> float:
        return 2.0 * self.batch * self.in_features * self.out_features


CONV_CASES = [
    ConvCase("fruit 1->8 4x4 32x32", 256, 1, 8, 4, 32, 0),
    ConvCase("cifar 3->32 3x3 32x32", 128, 3, 32, 3, 32, 1),
    ConvCase("64->64 3x3 32x32", 64, 64, 64, 3, 32, 1),
    ConvCase("fer 256->512 3x3 48x48", 8, 256, 512, 3, 48, 1),
]

# The convolutions of configs/cifar10_transfer_lite0.yaml's backbone (timm's
# tf_efficientnet_lite0 on CIFAR-10 upscaled to 96 px, batch 64) that cost the most:
# depthwise (groups = channels; strided ones as TF 'same' pads them, bottom/right) and
# pointwise (1x1).
BACKBONE_CASES = [
    ConvCase("lite0 dw 96 3x3 s2 48x48", 64, 96, 96, 3, 48, 1, stride=2, groups=96),
    ConvCase("lite0 dw 144 3x3 24x24", 64, 144, 144, 3, 24, 1, groups=144),
    ConvCase("lite0 dw 144 5x5 s2 24x24", 64, 144, 144, 5, 24, 2, stride=2, groups=144),
    ConvCase("lite0 dw 240 5x5 12x12", 64, 240, 240, 5, 12, 2, groups=240),
    ConvCase("lite0 dw 480 3x3 6x6", 64, 480, 480, 3, 6, 1, groups=480),
    ConvCase("lite0 dw 672 5x5 6x6", 64, 672, 672, 5, 6, 2, groups=672),
    ConvCase("lite0 dw 1152 5x5 3x3", 64, 1152, 1152, 5, 3, 2, groups=1152),
    ConvCase("lite0 pw 16->96 48x48", 64, 16, 96, 1, 48, 0),
    ConvCase("lite0 pw 144->24 24x24", 64, 144, 24, 1, 24, 0),
    ConvCase("lite0 pw 112->672 6x6", 64, 112, 672, 1, 6, 0),
    ConvCase("lite0 pw 1152->192 3x3", 64, 1152, 192, 1, 3, 0),
]

LINEAR_CASES = [
    LinearCase("fruit fc 6728->841", 256, 6728, 841),
    LinearCase("fruit fc 841->29", 256, 841, 29),
    LinearCase("cifar 3072->128", 1000, 3072, 128),
    LinearCase("cifar 3072->900", 200, 3072, 900),
]


def conv_fns(case: ConvCase, device, dtype):
    x = torch.randn(case.batch, case.in_channels, case.size, case.size, device=device, dtype=dtype)
    w = torch.randn(
        case.out_channels, case.in_channels // case.groups, case.kernel, case.kernel, device=device, dtype=dtype
    )
    b = torch.randn(case.out_channels, device=device, dtype=dtype)
    args = dict(stride=case.stride, padding=case.padding, groups=case.groups)
    return (
        lambda x, w, b: ops.conv2d(x, w, b, **args),
        lambda x, w, b: F.conv2d(x, w, b, **args),
        (x, w, b),
    )


def linear_fns(case: LinearCase, device, dtype):
    x = torch.randn(case.batch, case.in_features, device=device, dtype=dtype)
    w = torch.randn(case.out_features, case.in_features, device=device, dtype=dtype) / case.in_features**0.5
    b = torch.randn(case.out_features, device=device, dtype=dtype)
    return ops.linear_relu, lambda x, w, b: torch.relu(F.linear(x, w, b)), (x, w, b)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_fma_peak(threads: int) -> tuple[str, float] | None:
    """(ISA, GFLOP/s) of benchmarks/fma_peak.c on `threads` threads: the float32 FMA peak
    the figures are a share of. None (with a note printed) where no C compiler is found."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        print("# no C compiler (cc, gcc or $CC): FMA peak not measured")
        return None
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "fma_peak"
        source = Path(__file__).with_name("fma_peak.c")
        subprocess.run([compiler, "-O2", "-fopenmp", str(source), "-o", str(probe)], check=True)
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        isa, _, gflops = subprocess.run([str(probe)], env=environment, capture_output=True, text=True, check=True).stdout.split()
    return isa, float(gflops)


def median_ms(fn, inputs, threads, min_run_time, backward):
    leaves = [t.detach().clone().requires_grad_(backward) for t in inputs]
    if backward:
        grad = torch.randn_like(fn(*leaves))

        def step():
            torch.autograd.grad(fn(*leaves), leaves, grad)

    else:

        def step():
            with torch.no_grad():
                fn(*leaves)

    step()  # warm-up: first-call allocations and weight re-layouts stay out
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def run(cases, make_fns, device, dtype, threads, min_run_time, rounds):
    rows = []
    for case in cases:
        ours, theirs, inputs = make_fns(case, device, dtype)
        row = {"case": case.name, "batch": case.batch}
        for mode, backward in (("fwd", False), ("fwd+bwd", True)):
            # Rounds alternate torch and ours; the best median of each is kept,
            # so a noisy moment (or torch's allocator warming up) hurts neither.
            t_torch = t_ours = float("inf")
            for _ in range(rounds):
                t_torch = min(t_torch, median_ms(theirs, inputs, threads, min_run_time, backward))
                t_ours = min(t_ours, median_ms(ours, inputs, threads, min_run_time, backward))
            flops = case.flops() * (3 if backward else 1)
            row[mode] = (t_torch, t_ours, t_torch / t_ours, flops / t_ours / 1e6)
        rows.append(row)
        print_row(row, markdown=False, flush=True)
    return rows


HEADER = (
    "op shape", "N", "torch fwd ms", "ours fwd ms", "fwd x", "torch f+b ms", "ours f+b ms", "f+b x",
    "ours f+b GFLOP/s", "% of peak",
)  # fmt: skip
PEAK_GFLOPS = None  # set by main from the FMA probe (CPU)


def print_row(row, markdown, flush=False):
    f, fb = row["fwd"], row["fwd+bwd"]
    share = f"{100 * fb[3] / PEAK_GFLOPS:.0f}%" if PEAK_GFLOPS else "-"
    cells = (
        row["case"], str(row["batch"]),
        f"{f[0]:.3f}", f"{f[1]:.3f}", f"{f[2]:.2f}",
        f"{fb[0]:.3f}", f"{fb[1]:.3f}", f"{fb[2]:.2f}", f"{fb[3]:.0f}", share,
    )
    if markdown:
        print("| " + " | ".join(cells) + " |", flush=flush)
    else:
        print(f"{cells[0]:<26}" + "".join(f"{c:>14}" for c in cells[1:]), flush=flush)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    parser.add_argument("--only", choices=["conv", "linear", "backbone"], help="run one group of cases only")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best median counts")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in torch's CUDA kernels")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        where = f"{torch.cuda.get_device_name()}, TF32 {'on' if args.tf32 else 'off'}"
    else:
        where = (
            f"{cpu_model()}, {args.threads} threads, torch capability {torch.backends.cpu.get_cpu_capability()}"
        )
    print(
        f"# torch {torch.__version__}, {where}, {args.dtype}; best of {args.rounds} medians; "
        f"x = torch time / our time; load average {os.getloadavg()[0]:.2f} (other jobs distort the times)"
    )
    if args.device == "cpu":
        global PEAK_GFLOPS
        peak = measured_fma_peak(args.threads)
        if peak is not None:
            PEAK_GFLOPS = peak[1]
            print(f"# float32 FMA peak (benchmarks/fma_peak.c, {peak[0]}): {peak[1]:.0f} GFLOP/s on {args.threads} threads")
    print(f"{HEADER[0]:<26}" + "".join(f"{h:>14}" for h in HEADER[1:-2]) + f"{'GFLOP/s':>14}{'% peak':>14}")

    rows = []
    if args.only in (None, "conv"):
        rows += run(CONV_CASES, conv_fns, args.device, dtype, args.threads, args.min_run_time, args.rounds)
    if args.only in (None, "backbone"):
        rows += run(BACKBONE_CASES, conv_fns, args.device, dtype, args.threads, args.min_run_time, args.rounds)
    if args.only in (None, "linear"):
        rows += run(LINEAR_CASES, linear_fns, args.device, dtype, args.threads, args.min_run_time, args.rounds)
    if args.device == "cpu":
        # Which CPU route linear_relu timed and chose for each shape (csrc/cpu/route_choice.h).
        for line in sorted(torch.ops.lightning_hw.route_choices()):
            print("# route: " + line.replace("\t", " "))
    if args.markdown:
        print()
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
        for row in rows:
            print_row(row, markdown=True)


if __name__ == "__main__":
    main()
