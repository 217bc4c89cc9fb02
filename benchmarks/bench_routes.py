"""linear_relu's CPU routes one by one against torch, forward+backward, in one process.

    python benchmarks/bench_routes.py [--threads N] [--min-run-time S]

For each shape: torch's relu(linear), then ours with the built-in rule (timing off),
each route forced (streamed GEMMs, register tiles, torch's BLAS; "cannot run" where a route
cannot run the shape), and the timed choice
(csrc/cpu/route_choice.h; choices kept in a temporary folder, so every run times
afresh). Best of 3 medians each; GFLOP/s count 3 GEMMs; x = torch time / this time.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from lightning_hw import ops

SHAPES = [(1000, 3072, 900), (200, 3072, 900), (256, 6728, 841), (256, 841, 29), (1000, 3072, 128)]
# Name -> environment for ours (None: torch's own layers).
VARIANTS = {
    "torch": None,
    "rule": {"LIGHTNING_HW_AUTOTUNE": "0"},
    "streamed": {"LIGHTNING_HW_ROUTE": "streamed"},
    "tiles": {"LIGHTNING_HW_ROUTE": "tiles"},
    "blas": {"LIGHTNING_HW_ROUTE": "blas"},
    "timed": {},
}


def forward_backward_ms(fn, rows, in_features, out_features, threads, min_run_time) -> float:
    x = torch.randn(rows, in_features, requires_grad=True)
    w = (torch.randn(out_features, in_features) / in_features**0.5).requires_grad_()
    b = torch.randn(out_features, requires_grad=True)
    grad = torch.randn(rows, out_features)

    def step():
        x.grad = w.grad = b.grad = None
        fn(x, w, b).backward(grad)

    step()  # first call: the timed choice is made here, allocations warm up
    timer = benchmark.Timer("step()", globals={"step": step}, num_threads=threads)
    return min(timer.blocked_autorange(min_run_time=min_run_time).median for _ in range(3)) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["LIGHTNING_HW_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_routes_")
    print(f"# torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    for rows, in_features, out_features in SHAPES:
        flops = 6.0 * rows * in_features * out_features
        times = {}
        for name, environment in VARIANTS.items():
            for variable in ("LIGHTNING_HW_AUTOTUNE", "LIGHTNING_HW_ROUTE"):
                os.environ.pop(variable, None)
            os.environ.update(environment or {})
            fn = (lambda x, w, b: torch.relu(F.linear(x, w, b))) if environment is None else ops.linear_relu
            try:
                times[name] = forward_backward_ms(fn, rows, in_features, out_features, args.threads, args.min_run_time)
            except RuntimeError as error:  # a forced route that cannot run this shape says why
                if "cannot run" not in str(error):
                    raise
                times[name] = None
        cells = [f"{name} cannot run" if ms is None else f"{name} {ms:.2f} ms {flops / ms / 1e6:.0f} GFLOP/s x{times['torch'] / ms:.2f}"
                 for name, ms in times.items()]  # fmt: skip
        print(f"{rows}x{in_features}->{out_features}: " + " | ".join(cells), flush=True)
    for line in sorted(torch.ops.lightning_hw.route_choices()):
        print("# route: " + line.replace("\t", " "))


if __name__ == "__main__":
    main()
