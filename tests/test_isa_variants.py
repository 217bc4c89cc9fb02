"""Every instruction-set variant of the CPU kernels (csrc/cpu/tile_kernels.h: AVX-512, AVX2+FMA,
baseline SSE2) that this CPU runs passes the kernels' correctness grids: the tests marked
kernel_grid run in this process on its variant, and again here in one subprocess per other
variant, LIGHTNING_HW_CPU_ISA forcing it (each picks shapes that end in its own partial tiles,
tests/tiles.py). A variant this CPU cannot run is a skip that names the features it lacks.
LIGHTNING_HW_CPU_ISA naming no variant, or one the CPU cannot run, is an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_hw.ops  # noqa: F401  (loads the extension)
from tiles import kernel_tiles

TESTS = Path(__file__).resolve().parent
# name -> the CPU features it needs that this CPU lacks ("" where it runs it), best first.
VARIANTS = dict(line.split("\t") for line in torch.ops.lightning_hw.cpu_isa_variants())
THIS_PROCESS = kernel_tiles()["isa"]


def run_python(code: str, isa: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "LIGHTNING_HW_CPU_ISA": isa}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=TESTS.parent)  # fmt: skip


def test_this_process_runs_the_best_variant_or_the_forced_one():
    forced = os.environ.get("LIGHTNING_HW_CPU_ISA")
    best = next(name for name, missing in VARIANTS.items() if not missing)
    assert THIS_PROCESS == (forced or best)
    assert list(VARIANTS)[-1] == "baseline" and VARIANTS["baseline"] == ""  # every x86-64 CPU runs it


@pytest.mark.parametrize("isa", [name for name in VARIANTS if name != THIS_PROCESS])
def test_other_variant_passes_the_kernel_grids(isa):
    if VARIANTS[isa]:
        pytest.skip(f"this CPU cannot run the {isa} kernels: it lacks {VARIANTS[isa]}")
    env = {**os.environ, "LIGHTNING_HW_CPU_ISA": isa}
    command = [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", "-m", "kernel_grid", str(TESTS)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=TESTS.parent)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert f"lightning_hw CPU kernels: {isa} here" in result.stdout  # the header of the subprocess's session
    assert " passed" in result.stdout.splitlines()[-1] and " failed" not in result.stdout.splitlines()[-1]


def test_an_unknown_variant_is_an_error():
    code = "import torch, lightning_hw.ops as ops; ops.linear_relu(torch.randn(3, 4), torch.randn(5, 4))"
    result = run_python(code, "avx9000")
    assert result.returncode != 0
    names = ", ".join(VARIANTS)
    assert f"LIGHTNING_HW_CPU_ISA=avx9000 is not a kernel variant: expected one of {names}, or unset" in result.stderr


@pytest.mark.parametrize("route", ["blas", "tiles"])
def test_an_unknown_variant_is_an_error_whichever_route_runs(route):
    code = ("import os, torch, lightning_hw.ops as ops; os.environ['LIGHTNING_HW_ROUTE'] = " + repr(route) + "\n"
            "try:\n    ops.linear_relu(torch.randn(3, 4), torch.randn(5, 4))\n"
            "except RuntimeError as error:\n    print(error)")  # fmt: skip
    result = run_python(code, "AVX2")  # names are lower case
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("LIGHTNING_HW_CPU_ISA=AVX2 is not a kernel variant")


def test_a_variant_this_cpu_cannot_run_is_an_error():
    lacking = [name for name, missing in VARIANTS.items() if missing]
    if not lacking:
        pytest.skip(f"this CPU runs every kernel variant ({', '.join(VARIANTS)}): none to refuse")
    isa = lacking[0]
    result = run_python("import torch, lightning_hw.ops as ops; ops.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3))", isa)
    assert result.returncode != 0
    assert f"LIGHTNING_HW_CPU_ISA={isa}: this CPU cannot run the {isa} kernels, it lacks {VARIANTS[isa].replace(' ', ', ')}" in result.stderr


@pytest.mark.parametrize("isa", [name for name, missing in VARIANTS.items() if not missing])
def test_each_variant_reports_its_own_tiles(isa):
    result = run_python("import torch, lightning_hw.ops; print(*torch.ops.lightning_hw.cpu_kernel_tiles())", isa)
    assert result.returncode == 0, result.stderr[-2000:]
    tiles = dict(item.split("=") for item in result.stdout.split())
    assert tiles["isa"] == isa
    # A 64-byte vector is one zmm, two ymm or four xmm register; the pixel tiles shrink with the register file.
    assert tiles["vector_bytes"] == {"avx512": "64", "avx2": "32", "baseline": "16"}[isa]
    assert int(tiles["conv_pixels"]) == int(tiles["gemm_rows"]) >= 1
    if isa == THIS_PROCESS:
        assert tiles == {key: value if key == "isa" else ",".join(map(str, value)) for key, value in kernel_tiles().items()}

