"""Training as real processes: a `fit` killed mid-epoch resumes from its last checkpoint
with nothing lost and ends where an uninterrupted run ends; DDP on two CPU processes
(gloo) trains like one process on the same global batches; DDP `predict` writes every
prediction once, in data set order (and the gathering itself, with the other process emulated).

Each subprocess runs under a timeout, and the killed run is paused at a known batch
(tests/fakes.py PauseAtTrainBatch) rather than raced, so nothing here can hang."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed
from PIL import Image

from lightning_hw.callbacks import PredictionCollector
from lightning_hw.callbacks.predictions import gather_rows
from lightning_hw.cli import DEFAULT_CONFIG, main

TESTS_DIR = Path(__file__).resolve().parent
SUBPROCESS_TIMEOUT = 300  # seconds; the runs below take a few seconds each
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1"]


def subprocess_env() -> dict[str, str]:
    """This environment, with tests/ importable (for fakes.PauseAtTrainBatch) and no leftover DDP variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    return env


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m lightning_hw ARGS` in the background, stdout and stderr to `log`."""
    with open(log, "wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "lightning_hw", *args], stdout=output, stderr=subprocess.STDOUT,
            cwd=log.parent, env=subprocess_env(),
        )  # fmt: skip


def finish(process: subprocess.Popen, log: Path) -> str:
    """Wait for the process (under the timeout), check it succeeded, return its output."""
    try:
        process.wait(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"timed out after {SUBPROCESS_TIMEOUT} s:\n{log.read_text()[-3000:]}")
    output = log.read_text()
    assert process.returncode == 0, output[-3000:]
    return output


def run_in_process(args: list[str]) -> str:
    """`main(args)` here, returning what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(args)
    return printed.getvalue()


def test_accuracy(output: str) -> float:
    line = next(line for line in output.splitlines() if line.startswith("test accuracy: "))
    return float(line.split("test accuracy: ")[1].split("%")[0])


test_accuracy.__test__ = False  # a helper, not a test


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def column(rows: list[dict[str, str]], name: str) -> dict[tuple[int, int], float]:
    """{(epoch, step): value} of the rows where `name` was logged."""
    return {(int(r["epoch"]), int(r["step"])): float(r[name]) for r in rows if r.get(name)}


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(ours: dict, reference: dict, rtol: float, atol: float) -> None:
    assert ours.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# -- a killed run resumes --------------------------------------------------------------------------

RESUME_ARGS = ["--config", str(DEFAULT_CONFIG), "--trainer.max_epochs=3", "--trainer.limit_train_batches=6",
               "--trainer.limit_val_batches=3", "--data.batch_size=16", *QUIET]  # fmt: skip
STEPS_PER_EPOCH = 6


def test_fit_killed_mid_epoch_resumes_from_last_checkpoint_and_matches_uninterrupted_run(tmp_path):
    run_root, reference_root = tmp_path / "run", tmp_path / "reference"
    run_root.mkdir()
    marker = tmp_path / "paused"
    pause = tmp_path / "pause.yaml"
    pause.write_text(
        "trainer:\n  callbacks:\n    - class_path: fakes.PauseAtTrainBatch\n"
        f"      init_args: {{epoch: 1, batch_index: 3, marker: '{marker}'}}\n"
    )
    killed = start_cli(["fit", *RESUME_ARGS, "--config", str(pause), f"--trainer.default_root_dir={run_root}"],
                       run_root / "killed.log")  # fmt: skip
    try:
        # The uninterrupted reference trains here meanwhile.
        reference_output = run_in_process(["fit", *RESUME_ARGS, f"--trainer.default_root_dir={reference_root}"])
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while not marker.exists():
            assert killed.poll() is None, f"exited before the pause:\n{(run_root / 'killed.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the run never reached the pause"
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)  # mid-epoch 1, at its batch 3
        assert killed.wait(timeout=30) == -signal.SIGKILL
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait()
    assert int(marker.read_text()) == STEPS_PER_EPOCH + 3

    checkpoints = run_root / "lightning_logs" / "version_0" / "checkpoints"
    interrupted = load_checkpoint(checkpoints / "last.ckpt")
    assert (interrupted["epoch"], interrupted["global_step"]) == (0, STEPS_PER_EPOCH)

    resumed_output = run_in_process(["fit", *RESUME_ARGS, f"--trainer.default_root_dir={run_root}", "--ckpt_path=last"])

    # The resumed part logs into a new version folder: epochs 1 and 2, global steps going on from 6.
    resumed = read_metrics(run_root / "lightning_logs" / "version_1")
    reference = read_metrics(reference_root / "lightning_logs" / "version_0")
    resumed_steps = column(resumed, "train_loss_step")
    reference_steps = {key: value for key, value in column(reference, "train_loss_step").items() if key[0] >= 1}
    assert sorted(resumed_steps) == sorted(reference_steps)
    assert {epoch for epoch, _ in resumed_steps} == {1, 2} and len(resumed_steps) == 2 * STEPS_PER_EPOCH
    assert min(step for _, step in resumed_steps) in (STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1)
    for key, value in reference_steps.items():
        assert resumed_steps[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    reference_val = {key: value for key, value in column(reference, "val_loss").items() if key[0] >= 1}
    assert column(resumed, "val_loss") == pytest.approx(reference_val, rel=1e-5, abs=1e-6)

    # Checkpoints went on in the interrupted run's folder, ending where the reference ends.
    final = load_checkpoint(checkpoints / "last.ckpt")
    expected = load_checkpoint(reference_root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    assert (final["epoch"], final["global_step"]) == (expected["epoch"], expected["global_step"]) == (2, 3 * STEPS_PER_EPOCH)
    assert_same_weights(final["state_dict"], expected["state_dict"], rtol=1e-5, atol=1e-6)
    assert test_accuracy(resumed_output) == pytest.approx(test_accuracy(reference_output), abs=1e-9)


# -- DDP on two CPU processes ------------------------------------------------------------------------

DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
# Plain SGD: weight differences stay proportional to gradient differences (Adam's normalisation can
# magnify a rounding difference in a near-zero gradient up to a whole learning-rate step).
DDP_FIT_ARGS = ["--config", str(DEFAULT_CONFIG), "--trainer.max_epochs=2", "--trainer.limit_train_batches=6",
                "--trainer.limit_val_batches=2", "--model.optimizer=torch.optim.SGD",
                "--model.optimizer.init_args.lr=0.1", *QUIET]  # fmt: skip
GLOBAL_BATCH = 32

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed with gloo"
)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> Path:
    """The DDP runs' single-process twin: same seed and global batch, one process."""
    root = tmp_path_factory.mktemp("single")
    run_in_process(["fit", *DDP_FIT_ARGS, f"--data.batch_size={GLOBAL_BATCH}", f"--trainer.default_root_dir={root}"])
    return root / "lightning_logs" / "version_0"


@needs_gloo
def test_ddp_fit_on_two_cpu_processes_matches_single_process(tmp_path, single_process_run):
    # Each process takes every other sample of the epoch's (seeded) order, so with half the batch
    # per process the two batches together are the single process's batch, and DDP's averaged
    # gradient is its gradient: the weights must follow the same path. The default model has
    # neither dropout nor batch norm.
    ddp = start_cli(["fit", *DDP_FIT_ARGS, *DDP, f"--data.batch_size={GLOBAL_BATCH // 2}",
                     f"--trainer.default_root_dir={tmp_path}"], tmp_path / "ddp.log")  # fmt: skip
    output = finish(ddp, tmp_path / "ddp.log")
    assert "MEMBER: 2/2" in output and "test accuracy: " in output

    ddp_dir = tmp_path / "lightning_logs" / "version_0"
    ours = load_checkpoint(ddp_dir / "checkpoints" / "last.ckpt")
    reference = load_checkpoint(single_process_run / "checkpoints" / "last.ckpt")
    assert (ours["epoch"], ours["global_step"]) == (reference["epoch"], reference["global_step"]) == (1, 12)
    assert_same_weights(ours["state_dict"], reference["state_dict"], rtol=1e-6, atol=1e-6)
    # val_acc is synchronised across the processes (torchmetrics); the val batches split as the train ones.
    assert column(read_metrics(ddp_dir), "val_acc") == pytest.approx(column(read_metrics(single_process_run), "val_acc"))


def read_predictions(path: Path) -> list[list[str]]:
    with open(path, newline="") as file:
        return list(csv.reader(file))


def write_image_folder(folder: Path, count: int) -> None:
    """`count` gray pictures of assorted sizes, and a file that does not decode."""
    rng = np.random.default_rng()
    for index in range(count):
        size = (int(rng.integers(5, 40)), int(rng.integers(5, 40)))
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), "L").save(folder / f"picture_{index:02d}.png")
    (folder / "broken.png").write_bytes(b"not a png")


@needs_gloo
@pytest.mark.parametrize("source", ["test_split", "predict_dir"])
def test_ddp_predict_writes_every_prediction_once_in_data_set_order(tmp_path, single_process_run, source):
    checkpoint = single_process_run / "checkpoints" / "last.ckpt"
    predict_args = ["predict", "--config", str(DEFAULT_CONFIG), f"--ckpt_path={checkpoint}", *QUIET]
    count = 359  # the digits test split
    if source == "predict_dir":
        count = 37  # not a multiple of the two processes' batches
        (tmp_path / "pictures").mkdir()
        write_image_folder(tmp_path / "pictures", count)
        predict_args.append(f"--data.predict_dir={tmp_path / 'pictures'}")
    single_root, ddp_root = tmp_path / "single", tmp_path / "ddp"
    ddp_root.mkdir()
    ddp = start_cli([*predict_args, *DDP, "--data.batch_size=16", f"--trainer.default_root_dir={ddp_root}"],
                    ddp_root / "ddp.log")  # fmt: skip
    run_in_process([*predict_args, f"--trainer.default_root_dir={single_root}"])
    output = finish(ddp, ddp_root / "ddp.log")
    assert "MEMBER: 2/2" in output and f"predictions: {count} written to" in output

    expected = read_predictions(single_root / "lightning_logs" / "version_0" / "predictions.csv")
    rows = read_predictions(ddp_root / "lightning_logs" / "version_0" / "predictions.csv")
    probabilities = [f"prob_{digit}" for digit in range(10)]
    if source == "test_split":
        assert rows[0] == ["index", "class_index", "class_name", *probabilities]
        assert [int(row[0]) for row in rows[1:]] == list(range(count))  # the whole test split, each sample once
    else:
        assert "skipped: 1 unreadable files" in output
        assert rows[0] == ["path", "class_name", *probabilities, "status"]
        assert [row[0] for row in rows[1:]] == sorted(["broken.png", *(f"picture_{i:02d}.png" for i in range(count))])
    assert len(rows) == len(expected) and rows[0] == expected[0]
    for row, reference in zip(rows[1:], expected[1:]):
        # Other batches on two processes: the probabilities agree to rounding.
        assert [cell for cell, name in zip(row, rows[0]) if name not in probabilities] == [
            cell for cell, name in zip(reference, rows[0]) if name not in probabilities
        ]
        if row[-1] != "predicted" and source == "predict_dir":
            continue
        values = [float(cell) for cell, name in zip(row, rows[0]) if name in probabilities]
        reference_values = [float(cell) for cell, name in zip(reference, rows[0]) if name in probabilities]
        assert values == pytest.approx(reference_values, abs=2e-6)


# -- gathering predictions, with the other process emulated -------------------------------------------


class TwoProcessView:
    """The collectives of a two-process run as process `rank` sees them, the other process contributing
    `peer_tensors` in turn (one per gather_rows call) the way gather_rows would."""

    def __init__(self, rank: int, peer_tensors: list[torch.Tensor]) -> None:
        self.rank = rank
        self.peer_tensors = list(peer_tensors)

    def _in_rank_order(self, mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
        return torch.stack([mine, theirs] if self.rank == 0 else [theirs, mine])

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        peer = self.peer_tensors[0]
        if tensor.dim() == 0:  # the row counts
            return self._in_rank_order(tensor, torch.tensor(peer.shape[0]))
        self.peer_tensors.pop(0)
        padded = torch.zeros_like(tensor)
        padded[: peer.shape[0]] = peer
        return self._in_rank_order(tensor, padded)

    def broadcast(self, obj, src: int):
        peer = self.peer_tensors[0]
        return obj if src == self.rank else (tuple(peer.shape[1:]), peer.dtype)


@pytest.mark.parametrize("rank", [0, 1])
def test_gather_rows_concatenates_unequal_shares_in_rank_order(rank):
    mine, theirs = torch.randint(0, 9, (5, 3)), torch.randint(0, 9, (2, 3))
    gathered = gather_rows(TwoProcessView(rank, [theirs]), mine, world_size=2)
    assert torch.equal(gathered, torch.cat([mine, theirs] if rank == 0 else [theirs, mine]))


def test_gather_rows_from_a_process_without_rows_takes_the_others_shape_and_dtype():
    theirs = torch.randint(0, 9, (2, 3))
    gathered = gather_rows(TwoProcessView(1, [theirs]), torch.empty(0), world_size=2)
    assert gathered.dtype == torch.int64 and torch.equal(gathered, theirs)


def test_prediction_collector_orders_by_index_and_drops_repeats():
    # Process 0 predicted samples 0, 2, 4, 6 and (as a padding sampler would) 0 again; the other 1, 3, 5.
    def predicted_class(indices):
        return torch.tensor(indices) * 10

    collector = PredictionCollector()
    peer_indices = torch.tensor([1, 3, 5])
    view = TwoProcessView(0, [peer_indices, predicted_class([1, 3, 5])])
    trainer = SimpleNamespace(strategy=view, world_size=2)
    module = SimpleNamespace(device=torch.device("cpu"))
    collector.on_predict_epoch_start(trainer, module)
    for batch_idx, indices in enumerate([[0, 2], [4, 6], [0]]):
        collector.write_on_batch_end(trainer, module, predicted_class(indices), indices, None, batch_idx, 0)
    collector.on_predict_epoch_end(trainer, module)
    assert torch.equal(collector.indices, torch.arange(7))
    assert torch.equal(collector.predictions, torch.arange(7) * 10)


def test_prediction_collector_refuses_batches_without_indices():
    collector = PredictionCollector()
    with pytest.raises(RuntimeError, match="cannot tell which samples batch 3 holds"):
        collector.write_on_batch_end(None, None, torch.zeros(4), [], None, 3, 0)
