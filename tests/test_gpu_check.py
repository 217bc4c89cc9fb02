"""benchmarks/gpu_check.sh (issue 17: every GPU step in one command), checked without a GPU.

Its CPU mode (GPU_CHECK_ALLOW_CPU=1) runs the same steps on tiny settings: the summary must
list every step with its status; a failed or timed-out step is recorded, the later steps
still run (or are recorded as not run when the time budget is spent) and the exit status is
non-zero. The data helper's real-data subsets must stay readable by the DataModules' readers.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fakes import write_cifar10, write_fer2013_csv
from lightning_hw.data.cifar10 import load_cifar_batch
from lightning_hw.data.fer2013 import read_fer2013_csv

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = [
    "wheels", "env", "data", "build", "test_ops_cuda", "test_cuda_marked", "test_build",
    "bench_tf32_off", "bench_tf32_on", "fit_cifar10_twolayer", "fit_fer2013_cnn_small",
]  # fmt: skip

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout"
)


def run_check(tmp_path: Path, **settings: str) -> tuple[subprocess.CompletedProcess, Path, dict[str, dict]]:
    """Run the script in CPU mode with this interpreter; return the process, its output folder
    and steps.tsv as {step: row} (in the file's order)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GPU_CHECK_")}
    env.update(
        GPU_CHECK_ALLOW_CPU="1",
        GPU_CHECK_PYTHON=sys.executable,
        GPU_CHECK_WORK=str(tmp_path / "work"),
        GPU_CHECK_WHEELS=str(tmp_path / "no-wheels"),
        GPU_CHECK_CARRIED_DATA=str(tmp_path / "no-carried-data"),
    )
    env.update(settings)
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600)
    with open(out / "steps.tsv", newline="") as file:
        steps = {row["step"]: row for row in csv.DictReader(file, delimiter="\t")}
    return result, out, steps


def test_cpu_mode_runs_the_steps_and_writes_the_summary(tmp_path):
    archive = tmp_path / "gpu_check.tar.gz"
    result, out, steps = run_check(
        tmp_path,
        # env and build have tests of their own below; bench_ops.py is left out for time
        # (`GPU_CHECK_ALLOW_CPU=1 make gpu-check` runs every step).
        GPU_CHECK_STEPS="data,test_ops_cuda,fit_cifar10_twolayer",
        GPU_CHECK_FAKE_N="20",
        GPU_CHECK_ARCHIVE=str(archive),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(steps) == STEPS
    status = {name: row["status"] for name, row in steps.items()}
    assert status == {
        "wheels": "skip", "env": "skip", "data": "pass", "build": "skip", "test_ops_cuda": "pass",
        "test_cuda_marked": "skip", "test_build": "skip", "bench_tf32_off": "skip", "bench_tf32_on": "skip",
        "fit_cifar10_twolayer": "pass", "fit_fer2013_cnn_small": "skip",
    }  # fmt: skip
    assert steps["test_cuda_marked"]["note"] == "not in GPU_CHECK_STEPS"
    assert steps["data"]["note"].startswith("data: generated")
    # Without a GPU the CUDA tests are collected and skipped, none fails.
    ops_note = steps["test_ops_cuda"]["note"]
    assert "skipped" in ops_note and "passed" not in ops_note and "failed" not in ops_note
    assert (out / "test_ops_cuda.xml").is_file()
    fit_note = steps["fit_cifar10_twolayer"]["note"]
    assert "test accuracy: " in fit_note and "epoch=0 train_s=" in fit_note
    for row in steps.values():
        assert row["status"] != "pass" or float(row["seconds"]) > 0

    summary = (out / "summary.txt").read_text()
    assert summary.startswith("# gpu_check summary: PASS")
    assert "## fit_cifar10_twolayer" in summary and "test accuracy: " in summary
    assert result.stdout.rstrip().endswith(summary.rstrip())  # the end of the output is the summary
    # The archive holds the folder without checkpoints.
    assert list(out.rglob("*.ckpt"))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "out/summary.txt" in names and "out/fit_cifar10_twolayer.log" in names
    assert not [name for name in names if name.endswith(".ckpt")]


def test_failed_steps_are_recorded_and_the_later_steps_still_run(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text("def test_planted_failure():\n    assert 1 == 2\n")
    result, out, steps = run_check(
        tmp_path,
        GPU_CHECK_STEPS="data,build,test_build",
        GPU_CHECK_DATA="real",  # where no real data was carried
        GPU_CHECK_PYTEST_ARGS=f"{planted} -k planted",  # the step's own tests deselected, one failure added
    )
    assert result.returncode != 0
    assert steps["data"]["status"] == "FAIL" and steps["data"]["rc"] == "1"
    assert steps["build"]["status"] == "pass" and "has_cuda_kernels=" in steps["build"]["note"]
    assert steps["test_build"]["status"] == "FAIL" and "1 failed" in steps["test_build"]["note"]
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("# gpu_check summary: FAIL (2 steps)")
    assert "## Failed tests" in summary and "FAILED ::test_planted_failure - assert 1 == 2" in summary
    assert "real subset asked for" in result.stdout  # a failed step's log tail is shown


def test_a_step_over_its_time_is_a_timeout_and_the_budget_stops_the_rest(tmp_path):
    hanging = tmp_path / "python"
    hanging.write_text("#!/bin/sh\nexec sleep 60\n")
    hanging.chmod(0o755)
    result, out, steps = run_check(
        tmp_path, GPU_CHECK_PYTHON=str(hanging), GPU_CHECK_BUDGET_S="3", GPU_CHECK_MIN_STEP_S="1"
    )
    assert result.returncode != 0
    assert steps["env"]["status"] == "TIMEOUT" and steps["env"]["rc"] == "124"
    assert "timed out after 3s" in (out / "env.log").read_text()
    later = {name: row["status"] for name, row in steps.items() if name not in ("wheels", "env", "bench_tf32_on")}
    assert set(later.values()) == {"NOT_RUN"}, later
    assert "budget of 3s used up" in steps["data"]["note"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_mode_without_a_gpu_stops_after_env(tmp_path):
    result, out, steps = run_check(tmp_path, GPU_CHECK_ALLOW_CPU="0")
    assert result.returncode != 0
    assert list(steps) == ["wheels", "env", "all-other-steps"]
    assert steps["wheels"]["status"] == "skip" and "no wheels" in steps["wheels"]["note"]
    assert steps["env"]["status"] == "FAIL"
    assert steps["all-other-steps"]["status"] == "NOT_RUN"
    assert "no CUDA GPU visible" in (out / "env.log").read_text()


def write_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel of one module, valid for pip."""
    files = {
        f"{name}/__init__.py": f"__version__ = {version!r}\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record_name = f"{name}-{version}.dist-info/RECORD"
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[record_name] = "\n".join(record + [f"{record_name},,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_carried_wheels_are_installed_for_the_later_steps(tmp_path):
    # A stand-in for one of the packages the env step reports.
    write_wheel(tmp_path / "whl", "expecttest", "99.0")
    result, out, steps = run_check(
        tmp_path,
        GPU_CHECK_STEPS="wheels,env",
        GPU_CHECK_INSTALL_WHEELS="1",
        GPU_CHECK_WHEELS=str(tmp_path / "whl"),
        GPU_CHECK_SITE=str(tmp_path / "site"),
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert steps["wheels"]["status"] == "pass" and "1 wheels" in steps["wheels"]["note"]
    assert steps["env"]["status"] == "pass" and "torch: " + torch.__version__ in steps["env"]["note"]
    assert (tmp_path / "site" / "expecttest" / "__init__.py").is_file()
    assert "expecttest: 99.0" in (out / "env.log").read_text()


def test_real_data_subsets_keep_the_formats(tmp_path):
    """`gpu_check_util.py subset` then `data --mode real`, on data in the real formats."""
    source = tmp_path / "source"
    source.mkdir()
    batches = write_cifar10(tmp_path / "cifar", n_train_per_batch=30, n_test=30, seed=1)
    with tarfile.open(source / "cifar-10-batches-py.tar.xz", "w:xz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    fer_csv = write_fer2013_csv(tmp_path / "fer", n_per_usage=21, seed=1)
    with open(fer_csv, "rb") as file, lzma.open(source / "fer2013.csv.xz", "wb") as out:
        out.write(file.read())

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check_util
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    carried, work = tmp_path / "carried", tmp_path / "work"
    assert gpu_check_util.main(["subset", "--source", str(source), "--dest", str(carried), "--cifar-stride", "3", "--fer-stride", "2"]) == 0
    summary = (carried / "SUBSET.txt").read_text().splitlines()[0]
    assert summary == (
        "summary: CIFAR-10 50 train + 10 test (every 3th image); "
        "FER2013 Training 11, PublicTest 11, PrivateTest 11 (every 2th row)"
    )
    assert gpu_check_util.main(["data", "--work", str(work), "--carried", str(carried), "--mode", "real"]) == 0

    for name in ("data_batch_1", "data_batch_5", "test_batch"):
        images, labels = load_cifar_batch(work / "cifar10" / "cifar-10-batches-py" / name)
        full_images, full_labels = load_cifar_batch(batches / name)
        np.testing.assert_array_equal(images, full_images[::3])
        np.testing.assert_array_equal(labels, full_labels[::3])
    assert (work / "cifar10" / "cifar-10-batches-py" / "batches.meta").is_file()
    subset, full = read_fer2013_csv(work / "fer2013" / "fer2013.csv"), read_fer2013_csv(fer_csv)
    for split in ("train", "val", "test"):
        assert torch.equal(subset[split][0], full[split][0][::2])
        assert torch.equal(subset[split][1], full[split][1][::2])
