"""Micro-benchmarks: lightning_hw ops against PyTorch's own kernels.

    python benchmarks/bench_ops.py                  # CPU, all cores, all shapes, 3 processes
    python benchmarks/bench_ops.py --device cuda    # GPU (TF32 off unless --tf32)
    python benchmarks/bench_ops.py --only conv --markdown
    python benchmarks/bench_ops.py --only backbone  # EfficientNet-Lite0's depthwise/pointwise convs
    python benchmarks/bench_ops.py --processes 1    # everything in this one process

Each figure is a median of torch.utils.benchmark (forward, and forward+backward
computing every gradient). One process measures every case in rounds that
alternate torch and ours, and keeps the best median of each. Torch's CPU times
are bimodal from process to process (in some processes glibc hands it fresh pages
on every call); loading lightning_hw.ops fixes glibc's malloc thresholds, which
keeps torch in its fast mode in every process (lightning_hw/allocation.py; the
header says whether it applied). To make sure, the script runs itself
--processes times (3), one process after another, and keeps per case and mode
the fastest torch and the fastest ours over all of them: torch at its best.
"torch f+b spread" is torch's slowest process's f+b time over its fastest's:
well above 1 where a process caught torch's slow mode
(or other jobs slowed one process down; see the load average). "x" is torch's
time over ours: above 1 means ours is faster. Our GFLOP/s (3x the forward's
flops for f+b) carry their share of the float32 FMA peak (benchmarks/fma_peak.c),
or for bfloat16 (--dtype or --autocast) of the CPU's bf16 dot-product peak
(benchmarks/bf16_peak.c: AMX tiles or AVX512-BF16, where it has them), measured
once before the processes start. Progress goes to stderr; the report,
printed at the end, to stdout.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from lightning_hw import allocation, ops


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


# The /proc/cpuinfo flags that decide which kernels torch and ours can use.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile")


def cpuinfo_field(name: str) -> str | None:
    """The value of /proc/cpuinfo's first `name` line (Linux), else None."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Those of KERNEL_FLAGS that /proc/cpuinfo lists (none where it cannot be read)."""
    present = set((cpuinfo_field("flags") or "").split())
    return [flag for flag in KERNEL_FLAGS if flag in present]


# The peak probes: benchmarks/fma_peak.c (float32 FMAs) and benchmarks/bf16_peak.c
# (bfloat16 dot products on AMX tiles or AVX512-BF16; ISA "none" where the CPU has neither).
PEAK_PROBES = {"float32 FMA": "fma_peak.c", "bfloat16": "bf16_peak.c"}


def measured_peak(probe: str, threads: int) -> tuple[str, float] | None:
    """(ISA, GFLOP/s) of PEAK_PROBES[probe] on `threads` threads. None where no C
    compiler is found, or the CPU has no unit for it."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        probe_binary = Path(folder) / "peak"
        source = Path(__file__).with_name(PEAK_PROBES[probe])
        subprocess.run([compiler, "-O2", "-fopenmp", str(source), "-o", str(probe_binary)], check=True)
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        # A peak: the best of a few runs, so a moment of other work does not lower it.
        runs = [
            subprocess.run([str(probe_binary)], env=environment, capture_output=True, text=True, check=True)
            .stdout.split()
            for _ in range(3)
        ]
    if runs[0][0] == "none":
        return None
    return runs[0][0], max(float(gflops) for _, _, gflops in runs)


def measured_peaks(args) -> dict[str, tuple[str, float] | None]:
    """The peaks the header states, by PEAK_PROBES name: float32 always, bfloat16 too for a
    bfloat16 run (--dtype or --autocast). The figures' % is of the last one measured that exists:
    where the CPU has no bf16 unit our bfloat16 routes compute in float32."""
    names = ["float32 FMA"]
    if "bfloat16" in (args.dtype, args.autocast):
        names.append("bfloat16")
    return {name: measured_peak(name, args.threads) for name in names}


def reference_peak(peaks: dict[str, tuple[str, float] | None]) -> tuple[str, tuple[str, float]] | None:
    """(name, (ISA, GFLOP/s)) of the peak the figures are a share of."""
    present = [(name, peak) for name, peak in peaks.items() if peak is not None]
    return present[-1] if present else None


def median_ms(fn, inputs, threads, min_run_time, backward, autocast_dtype=None):
    """Median ms of fn on copies of inputs (forward, or forward+backward to every input);
    under torch.autocast(device, autocast_dtype) where that is given, as a mixed-precision
    training step runs it: float32 inputs, cast by autocast on every call."""
    leaves = [t.detach().clone().requires_grad_(backward) for t in inputs]
    device = inputs[0].device.type

    def forward():
        with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            return fn(*leaves)

    if backward:
        grad = torch.randn_like(forward())

        def step():
            torch.autograd.grad(forward(), leaves, grad)

    else:

        def step():
            with torch.no_grad():
                forward()

    step()  # warm-up: first-call allocations and weight re-layouts stay out
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


MODES = (("fwd", False), ("fwd+bwd", True))


def measure_cases(cases, make_fns, device, dtype, threads, min_run_time, rounds, autocast_dtype=None):
    """Rows of {case, batch, flops (forward's), fwd and fwd+bwd: {torch, ours} ms}; a
    progress line per case goes to stderr."""
    rows = []
    for case in cases:
        ours, theirs, inputs = make_fns(case, device, dtype)
        row = {"case": case.name, "batch": case.batch, "flops": case.flops()}
        for mode, backward in MODES:
            # Rounds alternate torch and ours; the best median of each is kept,
            # so a noisy moment (or torch's allocator warming up) hurts neither.
            t_torch = t_ours = float("inf")
            for _ in range(rounds):
                t_torch = min(t_torch, median_ms(theirs, inputs, threads, min_run_time, backward, autocast_dtype))
                t_ours = min(t_ours, median_ms(ours, inputs, threads, min_run_time, backward, autocast_dtype))
            row[mode] = {"torch": t_torch, "ours": t_ours}
        rows.append(row)
        times = ", ".join(f"{mode} {row[mode]['torch']:.3f}/{row[mode]['ours']:.3f}" for mode, _ in MODES)
        print(f"{case.name}: torch/ours ms {times}", file=sys.stderr, flush=True)
    return rows


# --only's groups of cases: (name, cases, their functions and inputs).
GROUPS = (("conv", CONV_CASES, conv_fns), ("backbone", BACKBONE_CASES, conv_fns), ("linear", LINEAR_CASES, linear_fns))


def autocast_dtype(args) -> torch.dtype | None:
    return getattr(torch, args.autocast) if args.autocast else None


def measure(args) -> dict:
    """This process's measurement: {"rows": measure_cases' rows, "routes": the CPU routes chosen}."""
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    dtype = getattr(torch, args.dtype)
    rows = []
    for group, cases, make_fns in GROUPS:
        if args.only in (None, group):
            rows += measure_cases(
                cases, make_fns, args.device, dtype, args.threads, args.min_run_time, args.rounds, autocast_dtype(args)
            )
    # Which CPU route our ops timed (or read from the cache) and chose per shape (csrc/cpu/route_choice.h).
    routes = sorted(torch.ops.lightning_hw.route_choices()) if args.device == "cpu" else []
    return {"rows": rows, "routes": routes}


def measure_in_processes(argv: list[str], count: int) -> list[dict]:
    """measure() of `count` runs of this script with `argv`, one after another (side by
    side they would slow each other down); each inherits the environment (threads, the
    route-choice cache LIGHTNING_HW_CACHE_DIR). Their output goes to stderr as it comes."""
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(1, count + 1):
            result_path = Path(folder) / f"process{index}.json"
            command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker-json", str(result_path)]
            tail = collections.deque(maxlen=40)
            with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
                for line in child.stdout:
                    print(f"[process {index}/{count}] {line}", end="", file=sys.stderr, flush=True)
                    tail.append(line)
            if child.returncode != 0:
                raise RuntimeError(
                    f"bench_ops process {index}/{count} failed (exit status {child.returncode}); its output ends:\n"
                    + "".join(tail)
                )
            results.append(json.loads(result_path.read_text()))
    return results


def best_of_processes(runs: list[list[dict]]) -> list[dict]:
    """One row per case (in first-seen order) from each process's measure_cases rows:
    per mode the fastest torch and the fastest ours over all processes, and torch's
    "f+b spread", its slowest process's f+b time over its fastest's."""
    rows_by_case = {}
    for rows in runs:
        for row in rows:
            rows_by_case.setdefault(row["case"], []).append(row)
    merged = []
    for case, rows in rows_by_case.items():
        best = {"case": case, "batch": rows[0]["batch"], "flops": rows[0]["flops"]}
        for mode, _ in MODES:
            best[mode] = {impl: min(row[mode][impl] for row in rows) for impl in ("torch", "ours")}
        torch_fb = [row["fwd+bwd"]["torch"] for row in rows]
        best["torch_fb_spread"] = max(torch_fb) / min(torch_fb)
        merged.append(best)
    return merged


COLUMNS = (
    "op shape", "N", "torch fwd ms", "ours fwd ms", "fwd x", "ours fwd GFLOP/s (% peak)",
    "torch f+b ms", "ours f+b ms", "f+b x", "ours f+b GFLOP/s (% peak)", "torch f+b spread",
)  # fmt: skip


def mode_cells(times: dict, flops: float, peak_gflops: float | None) -> tuple[str, ...]:
    """torch ms, ours ms, torch/ours, and our 'GFLOP/s (% of peak)' (GFLOP/s alone without a peak)."""
    gflops = flops / times["ours"] / 1e6
    rate = f"{gflops:.0f} ({100 * gflops / peak_gflops:.0f}%)" if peak_gflops else f"{gflops:.0f}"
    return f"{times['torch']:.3f}", f"{times['ours']:.3f}", f"{times['torch'] / times['ours']:.2f}", rate


def row_cells(row: dict, peak_gflops: float | None) -> tuple[str, ...]:
    return (
        row["case"],
        str(row["batch"]),
        *mode_cells(row["fwd"], row["flops"], peak_gflops),
        *mode_cells(row["fwd+bwd"], 3 * row["flops"], peak_gflops),
        f"{row['torch_fb_spread']:.2f}",
    )


def table_lines(rows: list[dict], peak_gflops: float | None, markdown: bool) -> list[str]:
    cells = [row_cells(row, peak_gflops) for row in rows]
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in (COLUMNS, *cells)]
        return [lines[0], "|" + "---|" * len(COLUMNS), *lines[1:]]
    widths = [max(len(line[i]) for line in (COLUMNS, *cells)) for i in range(len(COLUMNS))]
    return [
        line[0].ljust(widths[0]) + "".join(cell.rjust(width + 2) for cell, width in zip(line[1:], widths[1:]))
        for line in (COLUMNS, *cells)
    ]


def header_lines(
    args, peaks: dict[str, tuple[str, float] | None], load_at_start: float, load_at_end: float
) -> list[str]:
    """The report's header: what ran where, and how the best times were obtained."""
    torch_build = f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()})"
    lines = [
        f"# lightning_hw ops vs torch on {args.device}, {args.dtype}"
        + (f" under torch.autocast({args.device!r}, {args.autocast})" if args.autocast else "")
        + "; x = torch time / our time (above 1: ours faster)",
        f"# machine: {cpu_model()}; flags: {' '.join(cpu_flags()) or 'none of ' + ' '.join(KERNEL_FLAGS)}; "
        f"{args.threads} threads; {torch_build}",
    ]
    if args.device == "cuda":
        lines.append(f"# GPU: {torch.cuda.get_device_name()}, TF32 {'on' if args.tf32 else 'off'}")
    else:
        for name, peak in peaks.items():
            measured = (
                f"{peak[1]:.0f} GFLOP/s on {args.threads} threads (benchmarks/{PEAK_PROBES[name]}, {peak[0]})"
                if peak
                else "not measured (no C compiler: cc, gcc or $CC; or no such unit on this CPU)"
            )
            lines.append(f"# {name} peak: {measured}")
        reference = reference_peak(peaks)
        if reference:
            lines.append(f"# % peak: of the {reference[0]} peak")
    each = f"best of {args.rounds} alternating medians of >= {args.min_run_time} s"
    if args.processes == 1:
        lines.append(f"# torch and ours: {each}, all in this one process (torch's slow mode not ruled out)")
    else:
        lines += [
            f"# torch at its best: fastest of {args.processes} processes run one after another (each: {each}); "
            "ours likewise",
            "# torch f+b spread: torch's slowest process's f+b time / its fastest's (a slow mode, or other jobs)",
        ]
    lines.append(f"# glibc malloc (lightning_hw/allocation.py; on: torch's fast mode in every process): {allocation.tuning()}")
    lines.append(
        f"# load average (1 min): {load_at_start:.2f} at start, {load_at_end:.2f} at end (other jobs distort the times)"
    )
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    parser.add_argument("--only", choices=[name for name, _, _ in GROUPS], help="run one group of cases only")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best median counts")
    parser.add_argument(
        "--processes", type=int, default=3, help="processes run one after another; the fastest counts (1: this one)"
    )
    parser.add_argument(
        "--autocast",
        choices=["bfloat16", "float16"],
        help="both sides under torch.autocast in this dtype, on --dtype inputs (float32: a mixed-precision step)",
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in torch's CUDA kernels")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    # A child of measure_in_processes: measure, write the result there as JSON, print no report.
    parser.add_argument("--worker-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")

    if args.worker_json:
        args.worker_json.write_text(json.dumps(measure(args)))
        return
    load_at_start = os.getloadavg()[0]
    # Before the processes, not beside them: it would slow them, and they it.
    peaks = measured_peaks(args) if args.device == "cpu" else {}
    results = [measure(args)] if args.processes == 1 else measure_in_processes(argv, args.processes)
    rows = best_of_processes([result["rows"] for result in results])
    routes = sorted(set().union(*(result["routes"] for result in results)))
    load_at_end = os.getloadavg()[0]

    reference = reference_peak(peaks)
    peak_gflops = reference[1][1] if reference else None
    print("\n".join(header_lines(args, peaks, load_at_start, load_at_end)))
    print("\n".join(table_lines(rows, peak_gflops, markdown=False)))
    for route in routes:
        print("# route: " + route.replace("\t", " "))
    print(f"# load average (1 min) at end: {load_at_end:.2f}")
    if args.markdown:
        print()
        print("\n".join(table_lines(rows, peak_gflops, markdown=True)))


if __name__ == "__main__":
    main()
