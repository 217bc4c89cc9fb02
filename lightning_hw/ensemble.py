"""`python -m lightning_hw ensemble --checkpoints A.ckpt B.ckpt ...`: several trained
classifiers, one prediction (report 001).

Each member's class probabilities (softmax of its logits) on the test split
(`--split val` for the validation split) are computed once. Printed, and
written to `OUTPUT_DIR/ensemble.csv`: each member's accuracy, the accuracy of
the mean of the members' probabilities and, with `--margin M`, of report
001's deferral: the members are asked in the order given, and one whose top
two probabilities lie within M of each other defers to the next; the last
member always answers.

The data come from a fit config's `data` section (`--config FIT.yaml`, the
rest of it is not used) and/or `--data.*` options, as for the other
subcommands (default: configs/default.yaml). All members read the same
batches, so they must have been trained on the same input pipeline
(normalisation, image size). Checkpoints load with weights_only=True; the
model class named in a checkpoint must be one lightning_hw already imports.
"""

from __future__ import annotations

import json
from argparse import ArgumentError
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from jsonargparse import ArgumentParser
from jsonargparse.typing import Path_fr

import lightning_hw.models  # noqa: F401  (the classes a checkpoint may name)
from lightning_hw.cli import (
    DEFAULT_CONFIG,
    PROGRAM,
    config_option_value,
    imported_class,
    read_checkpoint,
    run_config_hint,
    write_table,
)
from lightning_hw.data import ImageClassificationDataModule
from lightning_hw.errors import CommandError, UsageError, parse_error_parts
from lightning_hw.models import ImageClassifier


def load_member(path: str | Path, device: torch.device) -> ImageClassifier:
    """A classifier from a checkpoint written by `fit`, in eval mode on `device`."""
    checkpoint = read_checkpoint(Path(path))
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if not isinstance(class_path, str):
        raise CommandError(
            "the checkpoint names no model class (hyper_parameters['_class_path'])", path, "give a checkpoint of fit"
        )
    model_class = imported_class(class_path)
    if not (isinstance(model_class, type) and issubclass(model_class, ImageClassifier)):
        raise CommandError(
            f"the checkpoint's model {class_path!r} is not an imported lightning_hw ImageClassifier",
            path,
            "give a checkpoint of fit",
        )
    model = model_class.load_from_checkpoint(path, map_location=device, weights_only=True)
    return model.eval()


@torch.inference_mode()
def member_probabilities(
    models: Sequence[ImageClassifier], loader: torch.utils.data.DataLoader, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (members, samples, classes) float32, labels (samples,)) over the loader."""
    probabilities: list[list[torch.Tensor]] = [[] for _ in models]
    labels = []
    for images, batch_labels in loader:
        images = images.to(device)
        for index, model in enumerate(models):
            probabilities[index].append(torch.softmax(model(images).float(), dim=1).cpu())
        labels.append(batch_labels)
    return torch.stack([torch.cat(member) for member in probabilities]), torch.cat(labels)


def mean_predictions(probabilities: torch.Tensor) -> torch.Tensor:
    """Classes of the members' mean probabilities, (members, samples, classes) -> (samples,)."""
    return probabilities.mean(dim=0).argmax(dim=1)


def margin_deferral(probabilities: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Report 001's deferral: per sample, the first member (in order) whose top two
    probabilities differ by at least `margin` answers; the last member answers otherwise.

    Returns (predicted classes (samples,), answering member (samples,)).
    """
    top_two = probabilities.topk(2, dim=2).values
    decides = (top_two[..., 0] - top_two[..., 1]) >= margin
    decides[-1] = True
    answering = decides.to(torch.int8).argmax(dim=0)  # the first True
    predicted = probabilities.argmax(dim=2).gather(0, answering.unsqueeze(0)).squeeze(0)
    return predicted, answering


@dataclass
class EnsembleResult:
    probabilities: torch.Tensor  # (members, samples, classes)
    labels: torch.Tensor
    rows: list[dict]
    table_path: Path


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted == labels).double().mean())


def evaluate(
    checkpoints: Sequence[str | Path],
    datamodule: ImageClassificationDataModule,
    output_dir: Path,
    margin: float | None = None,
    split: Literal["test", "val"] = "test",
    device: str = "auto",
) -> EnsembleResult:
    """Accuracy of each member, of the mean probabilities and of the margin deferral; printed and written as CSV."""
    if len(checkpoints) < 2:
        raise UsageError(
            "an ensemble needs at least 2 checkpoints",
            f"got {len(checkpoints)}",
            "pass --checkpoints A.ckpt B.ckpt ...",
        )
    if margin is not None and not 0.0 <= margin < 1.0:
        raise UsageError("--margin must lie in [0, 1)", margin, "give a difference of probabilities, e.g. 0.2")
    target = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    models = [load_member(path, target) for path in checkpoints]
    for path, model in zip(checkpoints, models):
        if model.num_classes != datamodule.num_classes or model.input_shape != tuple(datamodule.input_shape):
            raise CommandError(
                f"the checkpoint was trained for {model.num_classes} classes of shape {model.input_shape}, the data "
                f"have {datamodule.num_classes} of shape {tuple(datamodule.input_shape)}",
                path,
                f"give the data it was trained on, e.g. {run_config_hint(Path(path))}",
            )
    datamodule.prepare_data()
    datamodule.setup("test" if split == "test" else "validate")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    probabilities, labels = member_probabilities(models, loader, target)

    column = f"{split}_acc"

    def row(member: str, predicted: torch.Tensor, checkpoint: str = "", answered: int | str = "") -> dict:
        return {"member": member, "checkpoint": checkpoint, column: accuracy(predicted, labels), "answered": answered}

    rows = [row(f"member {i + 1}", probabilities[i].argmax(1), str(path)) for i, path in enumerate(checkpoints)]
    rows.append(row("mean", mean_predictions(probabilities)))
    if margin is not None:
        predicted, answering = margin_deferral(probabilities, margin)
        for member_row, count in zip(rows, torch.bincount(answering, minlength=len(models)).tolist()):
            member_row["answered"] = count
        rows.append(row(f"margin {margin:g}", predicted, answered=len(labels)))

    output_dir.mkdir(parents=True, exist_ok=True)
    table_path = write_table(rows, output_dir / "ensemble.csv")

    name = "test" if split == "test" else "validation"
    for row in rows:
        parts = [f"{row['member']}: {name} accuracy {100.0 * row[column]:.2f}%"]
        if row["checkpoint"]:
            parts.append(f"checkpoint: {row['checkpoint']}")
        if row["answered"] != "":
            parts.append(f"answered: {row['answered']}")
        print(" | ".join(parts))
    print(f"ensemble of {len(models)} on {len(labels)} samples | table: {table_path}")
    return EnsembleResult(probabilities, labels, rows, table_path)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=f"{PROGRAM} ensemble",
        description="Test accuracy of several checkpoints and of their ensemble.",
        exit_on_error=False,  # a mistake is raised, and reported in one line by lightning_hw.cli.main
        allow_abbrev=False,  # as the other subcommands: `-c`/`--config` only
    )
    parser.add_argument(
        "-c", "--config", type=Path_fr | None, default=None, help="A fit config; its data section is used."
    )
    parser.add_subclass_arguments(ImageClassificationDataModule, "data", required=False)
    parser.add_argument("--checkpoints", type=Path_fr, nargs="+", required=True, help="Two or more fit checkpoints.")
    parser.add_argument("--margin", type=float | None, default=None, help="Also report 001's deferral, this margin.")
    parser.add_argument("--split", type=Literal["test", "val"], default="test")
    parser.add_argument("--output_dir", type=str, default="runs/ensemble", help="Where ensemble.csv goes.")
    parser.add_argument("--device", type=str, default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    return parser


def config_data_arguments(args: list[str]) -> list[str]:
    """Put the data section of `--config FILE` in front, as a `--data` option; without
    --config and --data options, that of configs/default.yaml. (`export` reads its config so too.)"""
    config = None
    for index in range(len(args)):
        option = config_option_value(args, index)
        if option is not None:
            config = Path(option[0])
    if config is None:
        if any(arg.startswith("--data") for arg in args):
            return args
        config = DEFAULT_CONFIG
    if not config.is_file():
        raise UsageError("config not found", config, "give a fit config, whose data section the members are tested on")
    data = (yaml.safe_load(config.read_text()) or {}).get("data")
    if data is None:
        raise UsageError("the config has no data section", config, "give --data.class_path and --data.init_args.*")
    return [f"--data={json.dumps(data)}", *args]


def main(args: Sequence[str]) -> EnsembleResult:
    """`python -m lightning_hw ensemble ARGS`."""
    parser = build_parser()
    try:
        config = parser.parse_args(config_data_arguments(list(args)))
    except ArgumentError as error:
        raise UsageError(*parse_error_parts(str(error))) from error
    datamodule = parser.instantiate_classes(config).data
    return evaluate(
        [path.absolute for path in config.checkpoints],
        datamodule,
        Path(config.output_dir),
        margin=config.margin,
        split=config.split,
        device=config.device,
    )
