"""A normal install works away from the checkout: the sdist carries the sources and
configs and builds a wheel; the wheel, installed into a folder of its own, runs
`--help`, `fit` with the packaged default config (and `export` of its checkpoint, where the
export extra is installed) and a shipped config named without a path, from another directory.
(C++ kernels only, to keep the build short.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 1200  # seconds; the C++ build takes a few minutes on 2 cores
RUN_TIMEOUT = 300


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = RUN_TIMEOUT) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel built from that sdist)."""
    work = tmp_path_factory.mktemp("packages")
    backend = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = run([sys.executable, "-c", backend, str(work)], cwd=ROOT).strip().splitlines()[-1]
    sdist = work / name
    env = {**os.environ, "FORCE_CUDA": "0", "MAX_JOBS": str(os.cpu_count() or 1)}
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(work), str(sdist)],
        cwd=work, env=env, timeout=BUILD_TIMEOUT)  # fmt: skip
    (wheel,) = work.glob("lightning_hw-*.whl")
    return sdist, wheel


def test_sdist_carries_sources_and_configs(packages):
    sdist, _ = packages
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    sources = {path.relative_to(ROOT).as_posix() for path in (ROOT / "csrc").rglob("*") if path.is_file()}
    configs = {path.relative_to(ROOT).as_posix() for path in (ROOT / "lightning_hw" / "configs").rglob("*.yaml")}
    assert sources and configs and "lightning_hw/configs/default.yaml" in configs
    assert sources | configs | {"setup.py", "pyproject.toml", "lightning_hw/data/digits.npz"} <= names


def test_wheel_carries_configs_and_the_extension(packages):
    _, wheel = packages
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"lightning_hw/configs/default.yaml", "lightning_hw/configs/sweeps/cifar10_twolayer_grid.yaml"} <= names
    assert any(name.startswith("lightning_hw/_C") and name.endswith(".so") for name in names)


def test_installed_wheel_runs_from_another_directory(packages, tmp_path):
    _, wheel = packages
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(target), str(wheel)],
        cwd=elsewhere)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = run([sys.executable, "-c", "import lightning_hw; print(lightning_hw.__file__)"], elsewhere, env)
    assert Path(where.strip()).is_relative_to(target)  # the installed copy, not the checkout

    help_text = run([sys.executable, str(target / "bin" / "lightning-hw"), "--help"], elsewhere, env)
    for subcommand in ("fit", "validate", "test", "predict", "sweep", "ensemble", "export"):
        assert f"  {subcommand} " in help_text

    output = run([sys.executable, "-m", "lightning_hw", "fit", "--trainer.max_epochs=2",
                  "--trainer.limit_train_batches=5", "--trainer.enable_progress_bar=false",
                  f"--trainer.default_root_dir={elsewhere / 'runs'}"], elsewhere, env)  # fmt: skip
    assert "test accuracy: " in output and str(elsewhere / "runs") in output

    if importlib.util.find_spec("onnxscript") and importlib.util.find_spec("onnxruntime"):  # the export extra
        summary = dict(part.split(": ", 1) for part in output.strip().splitlines()[-1].split(" | "))
        exported = run([sys.executable, "-m", "lightning_hw", "export", "--config", f"{summary['logs']}/config.yaml",
                        "--ckpt_path", summary["checkpoint"], "--output", "digits.onnx"], elsewhere, env)  # fmt: skip
        assert "onnx: digits.onnx (" in exported and (elsewhere / "digits.onnx").is_file()

    printed = run([sys.executable, "-m", "lightning_hw", "fit", "--config", "cifar10_twolayer", "--print_config"],
                  elsewhere, env)  # fmt: skip
    assert "TwoLayerNet" in printed and "hidden_size: 1000" in printed
