"""`python -m lightning_hw fit|validate|test|predict`: LightningCLI over the
reports' models and DataModules.

- Any `ImageClassifier` subclass is `--model`, any `ImageClassificationDataModule`
  subclass is `--data`; the DataModule's num_classes, input_shape and class
  names are passed to the model.
- Configs ship inside the package (lightning_hw/configs; the checkout's
  configs/ links to it): `--config NAME` takes a shipped one by name
  (`cifar10_twolayer`, `sweeps/cifar10_twolayer_grid`), and without
  `--config` the packaged default.yaml is used: the digits CNN, offline.
- Checkpoints (best by val_acc, and last; `--checkpoint.*`), the plots callback
  (`--plots.*`), CSV logs and TensorBoard logs when tensorboard is installed.
- FiniteLossCheck is always on: a NaN/infinite training loss ends the run with
  a message (epoch, step, what to try) and exit status 1.
- `fit --ckpt_path last` resumes the newest last.ckpt under the logger's root
  and goes on checkpointing into that run's folder.
- `fit` ends with `test` on the best checkpoint and one summary line; `predict`
  writes predictions.csv (all processes' predictions under DDP, in data set
  order; with `--data.predict_dir DIR` one row per image file under DIR) into
  the run directory. Checkpoints load with weights_only=True.
- `sweep` (lightning_hw.sweep) and `ensemble` (lightning_hw.ensemble) have
  parsers of their own; each sweep trial is a `fit` built here.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

import lightning_hw
from lightning_hw.callbacks import FiniteLossCheck, NonFiniteLossError, PredictionCollector, TrainingPlots, run_directory
from lightning_hw.data import ImageClassificationDataModule
from lightning_hw.models import ImageClassifier

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Subcommands outside LightningCLI: name -> module whose main(args) runs it.
OTHER_SUBCOMMANDS = {"sweep": "lightning_hw.sweep", "ensemble": "lightning_hw.ensemble", "export": "lightning_hw.export"}
SUBCOMMAND_SUMMARIES = {
    "fit": "train a model, then test its best checkpoint (no --config: the digits CNN, offline)",
    "validate": "validation accuracy of a model or checkpoint (--ckpt_path)",
    "test": "test accuracy of a model or checkpoint (--ckpt_path)",
    "predict": "classify the test split, or every image under --data.predict_dir, into predictions.csv",
    "sweep": "hyper-parameter search (Optuna grid or TPE) over a fit config",
    "ensemble": "accuracy of several checkpoints and of their ensemble (--checkpoints A B ...)",
    "export": "a checkpoint as one ONNX file for deployment: images in [0, 1] in, class probabilities out",
}
LOG_NAME = "lightning_logs"


class LightningHWCLI(LightningCLI):
    """LightningCLI with the project's callbacks, links, loggers and end-of-run reports."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch:03d}-{val_acc:.4f}",
            }
        )
        parser.add_lightning_class_args(TrainingPlots, "plots")
        parser.add_lightning_class_args(FiniteLossCheck, "finite_loss")
        for attribute in ("num_classes", "input_shape", "class_names"):
            parser.link_arguments(f"data.{attribute}", f"model.init_args.{attribute}", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        logger = self._get(self.config_init, "trainer", default={}).get("logger")
        if logger is None or logger is True:
            kwargs["logger"] = default_loggers(self._get(self.config_init, "trainer").get("default_root_dir"))
        return super().instantiate_trainer(**kwargs)

    # The subcommands: LightningCLI calls these instead of the Trainer's methods.

    def fit(self, model: ImageClassifier, **kwargs: Any) -> None:
        kwargs.update(weights_only=True)
        if kwargs.get("ckpt_path") == "last":
            kwargs["ckpt_path"] = self._checkpoint_to_resume()
        try:
            self.trainer.fit(model, **kwargs)
        except NonFiniteLossError as error:
            # A diverged run is a failed run: its message (where, what to try), exit status 1, no traceback.
            raise SystemExit(f"error: {error}") from error
        if self.trainer.interrupted:
            return
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        results = self.trainer.test(
            model, datamodule=kwargs.get("datamodule"), ckpt_path=best or None, weights_only=True, verbose=False
        )
        self._print_summary("test", results, checkpoint=best or self._last_checkpoint())

    def validate(self, model: ImageClassifier, **kwargs: Any) -> None:
        kwargs.update(weights_only=True)
        results = self.trainer.validate(model, **kwargs)
        self._print_summary("val", results, checkpoint=kwargs.get("ckpt_path"))

    def test(self, model: ImageClassifier, **kwargs: Any) -> None:
        kwargs.update(weights_only=True)
        results = self.trainer.test(model, **kwargs)
        self._print_summary("test", results, checkpoint=kwargs.get("ckpt_path"))

    def predict(self, model: ImageClassifier, **kwargs: Any) -> None:
        kwargs.update(weights_only=True, return_predictions=False)
        # Under DDP each process predicts a share of the data: the collector gathers them all, in data set order.
        collector = PredictionCollector()
        self.trainer.callbacks.append(collector)
        self.trainer.predict(model, **kwargs)
        run_dir = run_directory(self.trainer)  # on every rank: it broadcasts under DDP
        if self.trainer.is_global_zero and collector.predictions is not None and len(collector.predictions):
            datamodule = kwargs.get("datamodule")
            folder = datamodule if getattr(datamodule, "predict_dir", None) is not None else None
            if folder is None:
                rows = prediction_rows(collector.predictions, model.class_names)
            else:
                rows = prediction_rows(
                    collector.predictions, model.class_names, folder.predict_files, folder.predict_skipped
                )
            run_dir.mkdir(parents=True, exist_ok=True)
            path = write_table(rows, run_dir / "predictions.csv")
            print(f"predictions: {len(collector.predictions)} written to {path}")
            if folder is not None and folder.predict_skipped:
                print(f"skipped: {len(folder.predict_skipped)} unreadable files, listed in {path}")

    def _checkpoint_to_resume(self) -> str:
        """What `--ckpt_path last` means: continue the newest earlier run under the logger's root.

        Every run logs into a new version folder and keeps its checkpoints there, so
        Lightning's own "last" would look in the new, empty folder and silently start
        afresh. Here the newest last*.ckpt is resumed and the checkpoint callback
        keeps writing into that run's folder, so its best-so-far and top-k carry on;
        the resumed part's logs go to the new version folder. With a fixed
        `--checkpoint.dirpath` (or no logger) Lightning's own lookup works.
        """
        callback = self.trainer.checkpoint_callback
        logger_root = getattr(self.trainer.logger, "root_dir", None)
        if not isinstance(callback, ModelCheckpoint) or callback.dirpath is not None or logger_root is None:
            return "last"
        candidates = Path(logger_root).glob("version_*/checkpoints/last*.ckpt")
        newest = max(candidates, key=lambda path: path.stat().st_mtime, default=None)
        if newest is None:
            return "last"
        callback.dirpath = str(newest.parent)
        return str(newest)

    def _last_checkpoint(self) -> str:
        callback = self.trainer.checkpoint_callback
        return getattr(callback, "last_model_path", "") or ""

    def _print_summary(self, stage: str, results: list, checkpoint: str | None) -> None:
        run_dir = run_directory(self.trainer)  # on every rank: it broadcasts under DDP
        if not self.trainer.is_global_zero or not results or f"{stage}_acc" not in results[0]:
            return
        name = "test" if stage == "test" else "validation"
        parts = [f"{name} accuracy: {100.0 * results[0][f'{stage}_acc']:.2f}%"]
        if checkpoint:
            parts.append(f"checkpoint: {checkpoint}")
        parts.append(f"logs: {run_dir}")
        plots = next((c for c in self.trainer.callbacks if isinstance(c, TrainingPlots)), None)
        if plots is not None and plots.written:
            parts.append(f"plots: {plots.written[0].parent}")
        print(" | ".join(parts))


def default_loggers(root_dir: str | None) -> list:
    """CSV logs, plus TensorBoard (same version folder) when tensorboard is installed."""
    save_dir = root_dir or "."
    csv_logger = CSVLogger(save_dir, name=LOG_NAME)
    loggers: list = [csv_logger]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(save_dir, name=LOG_NAME, version=csv_logger.version, default_hp_metric=False))
    return loggers


def write_table(rows: list[dict], path: Path) -> Path:
    """Write rows (dicts with the same keys) as CSV via a temporary file, so `path` is always whole."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)
    return path


def prediction_rows(
    probabilities: torch.Tensor,
    class_names: list[str],
    files: list[str] | None = None,
    skipped: list[tuple[str, str]] = (),
) -> list[dict]:
    """The rows of predictions.csv from the class probabilities (samples, classes).

    Samples of a split: `index, class_index, class_name, prob_<class>...`. Image
    files (`files`, one per sample, and the `skipped` files with the reason):
    `path, class_name, prob_<class>..., status`, ordered by path, a skipped file
    with an empty class and probabilities and `skipped: <reason>` as its status.
    """
    predicted = probabilities.argmax(dim=1).tolist()
    columns = [f"prob_{name}" for name in class_names]

    def probability_cells(row: list[float]) -> dict:
        return {column: f"{value:.6f}" for column, value in zip(columns, row)}

    if files is None:
        return [
            {"index": index, "class_index": label, "class_name": class_names[label], **probability_cells(row)}
            for index, (label, row) in enumerate(zip(predicted, probabilities.tolist()))
        ]
    rows = [
        {"path": path, "class_name": class_names[label], **probability_cells(row), "status": "predicted"}
        for path, label, row in zip(files, predicted, probabilities.tolist())
    ]
    rows += [
        {"path": path, "class_name": "", **dict.fromkeys(columns, ""), "status": f"skipped: {reason}"}
        for path, reason in skipped
    ]
    return sorted(rows, key=lambda row: row["path"])


def shipped_configs() -> list[str]:
    """The names `--config` takes for the configs shipped in the package, e.g. `sweeps/cifar10_twolayer_grid`."""
    return sorted(path.relative_to(CONFIG_DIR).with_suffix("").as_posix() for path in CONFIG_DIR.rglob("*.yaml"))


def resolve_config(value: str) -> str:
    """A `--config` value as a path: a file as given, else a shipped config by name (with or without .yaml)."""
    if Path(value).is_file() or "\n" in value:  # a file, or inline YAML, which jsonargparse also takes
        return value
    for candidate in (CONFIG_DIR / value, CONFIG_DIR / f"{value}.yaml"):
        if candidate.is_file():
            return str(candidate)
    # As a parser reports a bad option: the message on stderr, exit status 2.
    print(f"error: config {value!r} is neither a file nor a shipped config ({', '.join(shipped_configs())})",
          file=sys.stderr)  # fmt: skip
    raise SystemExit(2)


def _with_config_paths(args: list[str]) -> list[str]:
    """`args` with each `--config` value resolved (`resolve_config`), and for a trainer subcommand
    given no config `--config` of the packaged default.yaml."""
    resolved = list(args)
    given = False
    for index, arg in enumerate(resolved):
        if arg == "--config" and index + 1 < len(resolved):
            resolved[index + 1] = resolve_config(resolved[index + 1])
            given = True
        elif arg.startswith("--config="):
            resolved[index] = "--config=" + resolve_config(arg.split("=", 1)[1])
            given = True
    if not resolved or resolved[0] not in TRAINER_SUBCOMMANDS or given or {"-h", "--help"} & set(resolved):
        return resolved
    if not DEFAULT_CONFIG.is_file():
        raise SystemExit(f"default config {DEFAULT_CONFIG} not found: pass --config FILE.yaml")
    return [resolved[0], "--config", str(DEFAULT_CONFIG), *resolved[1:]]


def overview_help() -> str:
    """`python -m lightning_hw --help`: every subcommand in a line, and the shipped configs."""
    width = max(map(len, SUBCOMMAND_SUMMARIES))
    lines = [
        "usage: python -m lightning_hw SUBCOMMAND [--config FILE.yaml|NAME] [options]",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {summary}" for name, summary in SUBCOMMAND_SUMMARIES.items()),
        "",
        "`python -m lightning_hw SUBCOMMAND --help` lists a subcommand's options;",
        "`--version` prints the version and whether the CUDA kernels are built.",
        "",
        f"shipped configs (--config NAME; files in {CONFIG_DIR}):",
        *(f"  {name}" for name in shipped_configs()),
    ]
    return "\n".join(lines)


def version_text() -> str:
    kernels = "CPU and CUDA" if lightning_hw.has_cuda_kernels() else "CPU"
    return f"lightning_hw {lightning_hw.__version__} (torch {torch.__version__}; {kernels} kernels)"


def main(args: ArgsType = None, cli_class: Callable[..., LightningHWCLI] = LightningHWCLI) -> object:
    """Entry point of `python -m lightning_hw`; `args` as on the command line (default: sys.argv[1:]).

    Returns the LightningHWCLI (or what `sweep` / `ensemble` return); `cli_class`
    lets a caller run a subclass of it (the sweep's trials do).
    """
    from_command_line = args is None
    args = list(sys.argv[1:] if from_command_line else args)
    if args in ([], ["-h"], ["--help"]):
        print(overview_help())
        return None
    if args == ["--version"]:
        print(version_text())
        return None
    args = _with_config_paths(args)
    if args[0] in OTHER_SUBCOMMANDS:
        return importlib.import_module(OTHER_SUBCOMMANDS[args[0]]).main(args[1:])
    if from_command_line:
        # LightningCLI reads sys.argv itself (and warns when given both).
        sys.argv[1:] = args
    distributed_before = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        return cli_class(
            ImageClassifier,
            ImageClassificationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            auto_configure_optimizers=False,
            args=None if from_command_line else args,
        )
    finally:
        # Lightning leaves the process group of a DDP run open; one still alive at interpreter
        # exit can abort the process ("terminate called without an active exception").
        if not distributed_before and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
