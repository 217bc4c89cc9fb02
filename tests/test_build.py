"""The build never drops CUDA silently, and the extension reports how it was built."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_hw

ROOT = Path(__file__).resolve().parents[1]


def run_setup(env_overrides):
    env = {**os.environ, **env_overrides}
    return subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def cuda_buildable():
    """What setup.py's default asks of a CUDA build: a CUDA torch, .cu sources, nvcc."""
    has_sources = any((ROOT / "csrc" / "cuda").glob("*.cu"))
    has_nvcc = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()
    return torch.version.cuda is not None and has_sources and has_nvcc


def test_force_cuda_without_a_usable_toolkit_is_an_error():
    if cuda_buildable():
        pytest.skip("CUDA can be built here, so FORCE_CUDA=1 builds it (the install step does that)")
    result = run_setup({"FORCE_CUDA": "1"})
    assert result.returncode != 0
    assert "FORCE_CUDA=1 but CUDA cannot be built" in result.stderr
    if torch.version.cuda is None:
        assert "CPU-only build" in result.stderr


def test_build_configuration_is_printed():
    result = run_setup({"FORCE_CUDA": "0"})
    assert result.returncode == 0, result.stderr
    assert "lightning_hw build configuration" in result.stdout
    assert "CUDA kernels: not built (FORCE_CUDA=0)" in result.stdout
    assert "-fopenmp" in result.stdout


def test_extension_is_loaded_once_and_reports_its_build():
    import lightning_hw._C as ext  # a second import is the cached module, not a second load

    assert sys.modules["lightning_hw._C"] is ext
    assert lightning_hw.has_cuda_kernels() == torch.ops.lightning_hw.has_cuda_kernels()


@pytest.mark.skipif(not cuda_buildable(), reason="needs a CUDA torch and nvcc")
def test_cuda_kernels_are_built_where_they_can_be():
    """With a CUDA torch and nvcc the default build compiles and registers the
    CUDA kernels, GPU or not (FORCE_CUDA=0 is the only way to leave them out)."""
    if os.environ.get("FORCE_CUDA", "").strip().lower() in {"0", "false", "no", "off"}:
        pytest.skip("this environment builds with FORCE_CUDA=0")
    assert lightning_hw.has_cuda_kernels()
    for op in ("conv2d", "conv2d_backward", "linear_relu", "linear_relu_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lightning_hw::{op}", "CUDA"), op
