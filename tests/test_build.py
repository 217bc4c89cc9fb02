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


def test_force_cuda_without_a_usable_toolkit_is_an_error():
    has_sources = any((ROOT / "csrc" / "cuda").glob("*.cu"))
    has_nvcc = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()
    if torch.version.cuda is not None and has_sources and has_nvcc:
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
