"""`python -m lightning_hw ensemble`: members' and ensemble accuracies against a
hand computation on the bundled digits, margin deferral, and bad input."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fakes import write_cifar10
from lightning_hw.callbacks import plots
from lightning_hw.cli import CONFIG_DIR, DEFAULT_CONFIG, main
from lightning_hw.data import DigitsDataModule
from lightning_hw.ensemble import load_member, margin_deferral, mean_predictions
from lightning_hw.errors import CommandError
from lightning_hw.models import FruitCNN


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    """Three short default fits (digits CNN) that differ in seed and width: their best checkpoints."""
    root = tmp_path_factory.mktemp("members")
    patch = pytest.MonkeyPatch()
    patch.setattr(plots, "_save", lambda figure, path: figure.clear())  # PNGs are tested elsewhere
    checkpoints = []
    for seed, hidden in ((1, 64), (2, 128), (3, 32)):
        cli = main(["fit", f"--trainer.default_root_dir={root / str(seed)}", "--trainer.max_epochs=1",
                    "--trainer.limit_train_batches=6", "--trainer.enable_progress_bar=false",
                    "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=2",
                    "--trainer.limit_test_batches=1", f"--seed_everything={seed}",
                    f"--model.init_args.hidden_sizes=[{hidden}]"])  # fmt: skip
        checkpoints.append(Path(cli.trainer.checkpoint_callback.best_model_path))
    patch.undo()
    return checkpoints


def hand_probabilities(checkpoints: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's softmax on the digits test split, computed here from the default config's data."""
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())["data"]["init_args"]
    datamodule = DigitsDataModule(**data)
    datamodule.setup("test")
    images, labels = zip(*datamodule.test_dataloader())
    images, labels = torch.cat(images), torch.cat(labels)
    probabilities = []
    for path in checkpoints:
        model = FruitCNN.load_from_checkpoint(path, weights_only=True).eval()
        with torch.no_grad():
            probabilities.append(torch.softmax(model(images), dim=1))
    return torch.stack(probabilities), labels


def printed_accuracies(output: str) -> dict[str, float]:
    lines = [line for line in output.splitlines() if ": test accuracy " in line]
    return {line.split(":")[0]: float(line.split("test accuracy ")[1].split("%")[0]) for line in lines}


def test_ensemble_matches_a_hand_computation(members, tmp_path, capsys):
    probabilities, labels = hand_probabilities(members)
    # A margin that member 1 meets on about half of the samples.
    top_two = probabilities[0].topk(2, dim=1).values
    margin = round(float((top_two[:, 0] - top_two[:, 1]).median()), 3)
    result = main(["ensemble", "--checkpoints", *map(str, members), f"--margin={margin}",
                   f"--output_dir={tmp_path}", "--device=cpu"])  # fmt: skip
    printed = printed_accuracies(capsys.readouterr().out)

    torch.testing.assert_close(result.probabilities, probabilities)
    assert torch.equal(result.labels, labels)
    mean = probabilities.mean(dim=0)
    expected = {f"member {i + 1}": (probabilities[i].argmax(1) == labels).double().mean() for i in range(3)}
    expected["mean"] = (mean.argmax(1) == labels).double().mean()

    # Deferral by hand, one sample at a time.
    deferred, answered = [], [0, 0, 0]
    for sample in range(len(labels)):
        for member in range(3):
            top, second = probabilities[member, sample].topk(2).values.tolist()
            if top - second >= margin or member == 2:
                deferred.append(int(probabilities[member, sample].argmax()))
                answered[member] += 1
                break
    expected[f"margin {margin:g}"] = (torch.tensor(deferred) == labels).double().mean()
    assert 0 < answered[0] < len(labels) and sum(answered) == len(labels)

    rows = list(csv.DictReader(result.table_path.open()))
    assert [row["member"] for row in rows] == list(expected)
    for row in rows:
        assert float(row["test_acc"]) == pytest.approx(float(expected[row["member"]]))
        assert printed[row["member"]] == pytest.approx(100 * float(expected[row["member"]]), abs=0.005)
    assert [int(row["answered"]) for row in rows[:3]] == answered
    assert [row["checkpoint"] for row in rows[:3]] == [str(path) for path in members]


def test_margin_deferral_and_mean_on_hand_made_probabilities():
    # Dyadic values, so the gaps are exact and a gap equal to the margin counts as sure.
    probabilities = torch.tensor(
        [
            [[0.5, 0.25, 0.25], [0.875, 0.0625, 0.0625], [0.25, 0.25, 0.5]],  # member 1: gaps 0.25, 0.8125, 0.25
            [[0.125, 0.25, 0.625], [0.25, 0.625, 0.125], [0.5, 0.375, 0.125]],  # member 2
        ]
    )
    predicted, answering = margin_deferral(probabilities, margin=0.25)
    assert predicted.tolist() == [0, 0, 2] and answering.tolist() == [0, 0, 0]
    predicted, answering = margin_deferral(probabilities, margin=0.5)
    # Only sample 1 is sure enough for member 1; the last member answers the rest, sure or not.
    assert predicted.tolist() == [2, 0, 0] and answering.tolist() == [1, 0, 1]
    assert mean_predictions(probabilities).tolist() == [2, 0, 0]


def test_bad_ensembles_are_clear_errors(members, tmp_path, capsys):
    def error_of(args: list[str]) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_info:
            main(["ensemble", *args, f"--output_dir={tmp_path}"])
        return exit_info.value.code, capsys.readouterr().err

    status, error = error_of(["--checkpoints", str(members[0])])
    assert status == 2 and error.startswith("error: an ensemble needs at least 2 checkpoints (got 1): ")
    status, error = error_of(["--checkpoints", *map(str, members[:2]), "--margin=1.5"])
    assert status == 2 and error.startswith("error: --margin must lie in [0, 1) (1.5): ")
    cifar_dir = write_cifar10(tmp_path / "cifar").parent
    status, error = error_of(["-c", str(CONFIG_DIR / "cifar10_twolayer.yaml"), f"--data.init_args.data_dir={cifar_dir}",
                              "--checkpoints", *map(str, members[:2])])  # fmt: skip
    assert status == 1 and re.search(r"shape \(1, 8, 8\).*shape \(3, 32, 32\)", error)
    assert f"-c {members[0].parents[1] / 'config.yaml'}" in error  # the run's own config, which has its data
    # A checkpoint may only name a model class that is already imported, never make us import one.
    checkpoint = torch.load(members[0], weights_only=True)
    for class_path in ("subprocess.Popen", "not_imported_module.Model"):
        checkpoint["hyper_parameters"]["_class_path"] = class_path
        forged = tmp_path / "forged.ckpt"
        torch.save(checkpoint, forged)
        with pytest.raises(CommandError, match="not an imported lightning_hw ImageClassifier"):
            load_member(forged, torch.device("cpu"))
    assert "not_imported_module" not in sys.modules
