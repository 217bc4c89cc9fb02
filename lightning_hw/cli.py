"""`python -m lightning_hw fit|validate|test|predict`: LightningCLI over the
reports' models and DataModules.

- Any `ImageClassifier` subclass is `--model`, any `ImageClassificationDataModule`
  subclass is `--data`; the DataModule's num_classes, input_shape and class
  names are passed to the model.
- Configs ship inside the package (lightning_hw/configs; the checkout's
  configs/ links to it): `--config NAME` takes a shipped one by name
  (`cifar10_twolayer`, `sweeps/cifar10_twolayer_grid`), and without
  `--config` the packaged default.yaml is used: the digits CNN, offline.
- `-c` is `--config`; several configs merge in order. A config's YAML is checked
  first, so a syntax error names the file and line.
- Checkpoints (best by val_acc, and last.ckpt after every epoch; `--checkpoint.*`),
  the plots callback (`--plots.*`), CSV logs and TensorBoard logs when tensorboard
  is installed.
- FiniteLossCheck is always on: a NaN/infinite training loss ends the run with
  a message (epoch, step, what to try) and exit status 1.
- `fit --ckpt_path last` resumes the newest last.ckpt under the logger's root,
  after its last epoch, and goes on checkpointing into that run's folder.
- `validate`, `test` and `predict` need `--ckpt_path`; a checkpoint of another
  model or data shape than the config's is refused, naming the run's config.yaml.
- A user's mistake is one line on stderr, `error: <what> (<file or value>): <what
  to do>`, exit status 2 (usage) or 1 (data, checkpoint), without a traceback
  unless `--debug` or LIGHTNING_HW_DEBUG=1 (lightning_hw.errors); a command that
  fails before training leaves no run folder behind.
- `fit` ends with `test` on the best checkpoint and one summary line; `predict`
  writes predictions.csv (all processes' predictions under DDP, in data set
  order; with `--data.predict_dir DIR` one row per image file under DIR) into
  the run directory. Checkpoints load with weights_only=True.
- `sweep` (lightning_hw.sweep) and `ensemble` (lightning_hw.ensemble) have
  parsers of their own; each sweep trial is a `fit` built here.
"""

from __future__ import annotations

import csv
import difflib
import importlib
import importlib.util
import os
import pickle
import re
import shutil
import sys
from argparse import ArgumentError, RawDescriptionHelpFormatter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import DefaultHelpFormatter
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import lightning_hw
from lightning_hw.callbacks import (
    FiniteLossCheck,
    LastEpochCheckpoint,
    PredictionCollector,
    TrainingPlots,
    run_directory,
)
from lightning_hw.data import ImageClassificationDataModule
from lightning_hw.errors import (
    DEBUG_ENV,
    CommandError,
    UsageError,
    debug_requested,
    innermost_reason,
    parse_error_parts,
    report_errors,
    user_error,
)
from lightning_hw.models import ImageClassifier

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Subcommands outside LightningCLI: name -> module whose main(args) runs it.
OTHER_SUBCOMMANDS = {"sweep": "lightning_hw.sweep", "ensemble": "lightning_hw.ensemble", "export": "lightning_hw.export"}
SUBCOMMAND_SUMMARIES = {
    "fit": "train a model, then test its best checkpoint (no --config: the digits CNN, offline)",
    "validate": "validation accuracy of a trained model (--ckpt_path CKPT)",
    "test": "test accuracy of a trained model (--ckpt_path CKPT)",
    "predict": "classify every image under --data.predict_dir (or the test split) into predictions.csv "
    "(--ckpt_path CKPT)",
    "sweep": "hyper-parameter search (Optuna grid or TPE) over a fit config",
    "ensemble": "accuracy of several checkpoints and of their ensemble (--checkpoints A B ...)",
    "export": "a checkpoint as one ONNX file for deployment: images in [0, 1] in, class probabilities out",
}
LOG_NAME = "lightning_logs"
PROGRAM = "python -m lightning_hw"
CONFIG_HELP = (
    f"A YAML config: a file, or the name of a shipped one (`{PROGRAM} --help` lists them). "
    "Given several times, they merge in order. Without it, fit uses the packaged default.yaml."
)
# Shown under each subcommand's usage line (`--help`), line breaks kept; {models} and {data} list the classes.
RUN_FOLDER = "RUN is the run folder a fit printed (e.g. runs/default/lightning_logs/version_0)."
SUBCOMMAND_DESCRIPTIONS = {
    "fit": f"""Train a model, then test its best checkpoint:

  {PROGRAM} fit -c fruits_cnn --data.data_dir data/fruits

The run folder (printed at the end) gets config.yaml, metrics.csv, plots/ and checkpoints/:
best-*.ckpt (by --checkpoint.monitor) and last.ckpt, written after every epoch.
--ckpt_path last resumes the newest run after its last epoch. Without -c: the digits CNN, offline.
Models: {{models}} (their options: --model.help NAME).
Data sets: {{data}} (their options: --data.help NAME).""",
    "validate": f"""Validation accuracy of a trained model:

  {PROGRAM} validate -c RUN/config.yaml --ckpt_path RUN/checkpoints/best-....ckpt

{RUN_FOLDER}""",
    "test": f"""Test accuracy of a trained model:

  {PROGRAM} test -c RUN/config.yaml --ckpt_path RUN/checkpoints/best-....ckpt

{RUN_FOLDER}""",
    "predict": f"""Classify images with a trained model into predictions.csv, in a new run folder printed at the end.
To classify a folder of your own images:

  {PROGRAM} predict -c RUN/config.yaml --ckpt_path RUN/checkpoints/best-....ckpt --data.predict_dir DIR

{RUN_FOLDER}
Every image file under DIR, subfolders included (png, jpg, bmp, gif, tif, webp), is resized and
normalised as the training images were and gets one row: path, class_name, prob_<class> for each
class, status; a file that cannot be read is listed as skipped. Without --data.predict_dir the
data set's test split is classified.""",
}


class HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, keeping a description's line breaks (its example commands stay whole)."""


class LightningHWCLI(LightningCLI):
    """LightningCLI with the project's callbacks, links, loggers, checks and end-of-run reports."""

    _checkpoint: tuple[Path, dict] | None = None  # --ckpt_path, read: (path, its hyper-parameters)

    def __init__(self, *args: Any, parser_kwargs: dict | None = None, **kwargs: Any) -> None:
        # Parse errors are raised (and reported as one line by `main`), not printed under the whole usage;
        # no abbreviated options (`--conf X` would be a config that `-c`/`--config` handling never sees).
        settings: dict[str, Any] = {
            "prog": PROGRAM,
            "exit_on_error": False,
            "allow_abbrev": False,
            "formatter_class": HelpFormatter,
        }
        for name in self.subcommands():
            settings[name] = {"usage": f"{PROGRAM} {name} [-c FILE.yaml|NAME] [options]"}
            if name in SUBCOMMAND_DESCRIPTIONS:
                settings[name]["description"] = SUBCOMMAND_DESCRIPTIONS[name].format(
                    program=PROGRAM,
                    models=", ".join(subclass_names(ImageClassifier)),
                    data=", ".join(subclass_names(ImageClassificationDataModule)),
                )
        for key, value in (parser_kwargs or {}).items():
            settings[key] = {**settings[key], **value} if isinstance(settings.get(key), dict) else value
        super().__init__(*args, parser_kwargs=settings, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        next(action for action in parser._actions if action.dest == "config").help = CONFIG_HELP
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LastEpochCheckpoint, "checkpoint")
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

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            raise parse_error(str(error)) from error

    def _parse_ckpt_path(self) -> None:
        """Check `--ckpt_path` before LightningCLI takes the model's arguments from the checkpoint.

        validate/test/predict refuse to run without one (they would use untrained weights).
        A checkpoint must be a readable file whose model class is the config's: LightningCLI
        would otherwise build the checkpoint's class, a model the user never chose.
        """
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return super()._parse_ckpt_path()
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path is None:
            if subcommand != "fit":
                raise UsageError(
                    f"{subcommand} needs a trained model",
                    "no --ckpt_path",
                    f"pass --ckpt_path RUN/checkpoints/best-....ckpt with -c RUN/config.yaml, RUN being the run "
                    "folder a fit printed",
                )
            return None
        if (subcommand == "fit" and ckpt_path in ("last", "best", "hpc", "registry")) or "://" in ckpt_path:
            return super()._parse_ckpt_path()  # resolved by the Trainer (fit's "last": see fit())
        path = Path(ckpt_path)
        hyper_parameters = read_checkpoint(path).get("hyper_parameters") or {}
        held = hyper_parameters.get("_class_path")
        configured = getattr(self.config[subcommand].get("model"), "class_path", None)
        if isinstance(held, str) and configured and not same_class(held, configured):
            raise CommandError(
                f"the checkpoint holds a {held.rpartition('.')[2]} model ({held}), not the config's "
                f"{configured.rpartition('.')[2]}",
                path,
                f"pass the config of the run that wrote it, {run_config_hint(path)}",
            )
        self._checkpoint = (path, hyper_parameters)
        return super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as error:
            # The constructors' and the Trainer's argument checks: a value in the config or an option.
            todo = f"{innermost_reason(str(error))}; change it in the config or the option"
            raise UsageError("invalid configuration", None, todo) from error

    def after_instantiate_classes(self) -> None:
        """A checkpoint of the config's model class, but trained on other data, is refused before it loads."""
        super().after_instantiate_classes()
        if not self._checkpoint:
            return
        path, hyper_parameters = self._checkpoint
        trained = (hyper_parameters.get("num_classes"), tuple(hyper_parameters.get("input_shape") or ()))
        configured = (self.model.num_classes, self.model.input_shape)
        if trained[0] is not None and trained != configured:
            raise CommandError(
                f"the checkpoint's {type(self.model).__name__} was trained on {trained[0]} classes of shape "
                f"{trained[1]}, the config's data ({type(self.datamodule).__name__}) have {configured[0]} of shape "
                f"{configured[1]}",
                path,
                f"pass the config of the run that wrote it, {run_config_hint(path)}",
            )

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a user's mistake before training leaves no run folder behind (e.g. the
        logger's version folder with only config.yaml)."""
        created = first_missing_folder(run_directory(self.trainer))
        training = TrainingStarted()
        self.trainer.callbacks.append(training)
        try:
            super()._run_subcommand(subcommand)
        except Exception as error:
            if created is not None and not training.started and user_error(error) and self.trainer.is_global_zero:
                shutil.rmtree(created, ignore_errors=True)
            raise

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
            # A diverged run (NonFiniteLossError) is a failed run: `main` reports its message, exit status 1.
            self.trainer.fit(model, **kwargs)
        except SystemExit:  # Ctrl-C: Lightning (2.6) ends the process, status 1
            self._report_interruption()
            raise
        if self.trainer.interrupted:  # Ctrl-C: older Lightning returns
            self._report_interruption()
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

    def _report_interruption(self) -> None:
        if not self.trainer.interrupted or not self.trainer.is_global_zero:
            return
        last = self._last_checkpoint()
        message = (
            f"interrupted: {last} holds the last whole epoch; the same command with --ckpt_path last resumes after it"
            if last
            else "interrupted before the first epoch ended: no checkpoint to resume from"
        )
        print(message, file=sys.stderr)

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


class TrainingStarted(Callback):
    """Notes whether training began (after the set-up, the checkpoint's restore and the sanity check)."""

    started = False

    def on_train_start(self, trainer: Trainer, pl_module: ImageClassifier) -> None:
        self.started = True


def first_missing_folder(path: Path) -> Path | None:
    """The outermost folder of `path` (itself included) that does not exist yet, or None."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents (weights_only), or a CommandError that says what is wrong with the file."""
    if not path.is_file():
        raise CommandError(
            "checkpoint not found", path, "give the .ckpt file of a fit (its run folder's checkpoints/best-*.ckpt)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # the restricted unpickler of weights_only, or not a pickle at all
        raise CommandError(
            "cannot read the checkpoint: not a torch checkpoint, or it holds objects other than weights",
            path,
            "give a .ckpt file written by fit",
        ) from error
    except Exception as error:  # any other way of not being a checkpoint (torch's zip reader, a truncated file)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]  # its first sentence
        what = f"cannot read the checkpoint ({reason})"
        raise CommandError(what, path, "give a .ckpt file written by fit") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CommandError("not a Lightning checkpoint (no state_dict)", path, "give a .ckpt file written by fit")
    return checkpoint


def imported_class(class_path: str) -> object:
    """What `class_path` names in a module already imported, else None: a class path read from a
    checkpoint must not make us import code."""
    module, _, name = class_path.rpartition(".")
    return getattr(sys.modules.get(module), name, None)


def same_class(class_path: str, other: str) -> bool:
    """Whether two import paths name one class (`imported_class`: modules already imported only)."""
    found = imported_class(class_path)
    return class_path == other or (found is not None and found is imported_class(other))


def run_config_hint(checkpoint: Path) -> str:
    """Where the config of the run that wrote `checkpoint` is, as an option."""
    run_config = checkpoint.absolute().parent.parent / "config.yaml"  # RUN/checkpoints/x.ckpt -> RUN/config.yaml
    if checkpoint.parent.name == "checkpoints" and run_config.is_file():
        return f"-c {run_config}"
    return "-c RUN/config.yaml (RUN: the run folder that holds checkpoints/)"


def subclass_names(base: type) -> list[str]:
    """The names of the imported concrete subclasses of `base`, which `--model NAME` / `--data NAME` take."""
    found, pending = set(), [base]
    while pending:
        for subclass in pending.pop().__subclasses__():
            pending.append(subclass)
            if not getattr(subclass, "__abstractmethods__", None) and not subclass.__name__.startswith("_"):
                found.add(subclass.__name__)
    return sorted(found)


def resolves_to_subclass(name: str, base: type) -> bool:
    """Whether `--model NAME` (or a class_path) names a subclass of `base`: a short name of an
    imported one, or an import path."""
    if "." not in name:
        return name in subclass_names(base)
    module, _, attribute = name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(found, type) and issubclass(found, base)


# The class names in jsonargparse's messages about a class it could not resolve.
_CLASS_IN_ERROR = re.compile(
    r"Expected a dot import path string: (\S+)|Problem with given class_path '([^']+)'|Import path (\S+) does not"
)


def parse_error(message: str) -> UsageError:
    """A LightningCLI parse error as a UsageError; an unknown model or data class lists the valid ones."""
    what, value, todo = parse_error_parts(message)
    bases = {"model": ImageClassifier, "data": ImageClassificationDataModule}
    kind = what.removeprefix("invalid value for --")
    if kind in bases:
        base = bases[kind]
        for match in _CLASS_IN_ERROR.finditer(message):
            name = next(part for part in match.groups() if part)
            if not resolves_to_subclass(name, base):
                choices = ", ".join(subclass_names(base))
                todo = f"choose one of {choices} (--{kind} NAME, or {kind}.class_path in a config)"
                return UsageError(f"unknown {kind} class", name, todo)
    return UsageError(what, value, todo)


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
    raise UsageError("config not found", value, f"give a YAML file or a shipped config: {', '.join(shipped_configs())}")


def check_config_file(path: str) -> None:
    """A config file's YAML, checked before the parser reads it: a syntax error names the file and line."""
    if "\n" in path:  # inline YAML
        return
    try:
        content = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise yaml_syntax_error(path, error) from error
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read the config ({error})", path, "give a readable YAML file") from error
    if content is not None and not isinstance(content, dict):
        raise UsageError(
            f"the config is a YAML {type(content).__name__}, not a mapping of options",
            path,
            "write it as sections (trainer:, model:, data:), as `fit --print_config` shows",
        )


def yaml_syntax_error(path: str, error: yaml.YAMLError) -> UsageError:
    """`error` as the file and line, and what the YAML parser found there."""
    mark, context_mark = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
    if mark is None:
        return UsageError("YAML syntax error", path, f"{' '.join(str(error).split())}; correct the file")
    problem = getattr(error, "problem", None) or "invalid YAML"
    context = getattr(error, "context", None)
    if context and context_mark is not None:
        problem += f" ({context} from line {context_mark.line + 1}, column {context_mark.column + 1})"
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}"
    return UsageError("YAML syntax error", where, f"{problem}; correct the file")


def config_option_value(args: list[str], index: int) -> tuple[str, int] | None:
    """If args[index] is `-c`/`--config` (`-c X`, `-c=X`, `-cX`, `--config X`, `--config=X`), its
    value and the number of arguments it takes; else None."""
    arg = args[index]
    if arg in ("-c", "--config"):
        return (args[index + 1], 2) if index + 1 < len(args) else None  # a missing value: the parser says so
    for prefix in ("--config=", "-c=", "-c"):  # "-c" last: "-c=X" is X, as argparse reads it
        if arg.startswith(prefix):
            return arg[len(prefix) :], 1
    return None


def _with_config_paths(args: list[str]) -> list[str]:
    """`args` with each `-c`/`--config` as `--config PATH` (`resolve_config`, its YAML checked), and
    for a trainer subcommand given no config `--config` of the packaged default.yaml."""
    resolved: list[str] = []
    given = False
    index = 0
    while index < len(args):
        option = config_option_value(args, index)
        if option is None:
            resolved.append(args[index])
            index += 1
            continue
        path = resolve_config(option[0])
        check_config_file(path)
        resolved += ["--config", path]
        given = True
        index += option[1]
    if not resolved or resolved[0] not in TRAINER_SUBCOMMANDS or given or {"-h", "--help"} & set(resolved):
        return resolved
    if not DEFAULT_CONFIG.is_file():
        raise UsageError("default config not found", DEFAULT_CONFIG, "reinstall lightning_hw, or pass -c FILE.yaml")
    return [resolved[0], "--config", str(DEFAULT_CONFIG), *resolved[1:]]


def subcommand_names() -> list[str]:
    """Every subcommand, in the order the overview lists them."""
    return [*TRAINER_SUBCOMMANDS, *OTHER_SUBCOMMANDS]


def check_subcommand(name: str) -> None:
    names = subcommand_names()
    if name in names:
        return
    if name.startswith("-"):
        usage = f"{PROGRAM} SUBCOMMAND [options], SUBCOMMAND one of {', '.join(names)}"
        raise UsageError("expected a subcommand first", name, usage)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UsageError("unknown subcommand", name, f"{hint}choose one of {', '.join(names)} ({PROGRAM} --help)")


def overview_help() -> str:
    """`python -m lightning_hw --help`: every subcommand in a line, and the shipped configs."""
    width = max(map(len, SUBCOMMAND_SUMMARIES))
    lines = [
        f"usage: {PROGRAM} SUBCOMMAND [-c FILE.yaml|NAME] [options]",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {summary}" for name, summary in SUBCOMMAND_SUMMARIES.items()),
        "",
        f"`{PROGRAM} SUBCOMMAND --help` lists a subcommand's options;",
        "`--version` prints the version and whether the CUDA kernels are built;",
        f"`--debug` shows the traceback of an error (or {DEBUG_ENV}=1).",
        "",
        f"shipped configs (-c NAME; files in {CONFIG_DIR}):",
        *(f"  {name}" for name in shipped_configs()),
    ]
    return "\n".join(lines)


def version_text() -> str:
    kernels = "CPU and CUDA" if lightning_hw.has_cuda_kernels() else "CPU"
    return f"lightning_hw {lightning_hw.__version__} (torch {torch.__version__}; {kernels} kernels)"


def main(args: ArgsType = None, cli_class: Callable[..., LightningHWCLI] = LightningHWCLI) -> object:
    """Entry point of `python -m lightning_hw`; `args` as on the command line (default: sys.argv[1:]).

    Returns the LightningHWCLI (or what `sweep` / `ensemble` return). A user's mistake ends
    in `error: ...` on stderr and SystemExit (lightning_hw.errors), with the traceback when
    `--debug` is among `args` or LIGHTNING_HW_DEBUG=1.
    """
    from_command_line = args is None
    debug, arguments = debug_requested(list(sys.argv[1:] if from_command_line else args))
    with report_errors(debug):
        return run_command(arguments, cli_class, from_command_line=from_command_line)


def run_command(
    args: list[str], cli_class: Callable[..., LightningHWCLI] = LightningHWCLI, from_command_line: bool = False
) -> object:
    """`main` without the error reporting: a user's mistake is raised (the sweep runs its trials so)."""
    if args in ([], ["-h"], ["--help"]):
        print(overview_help())
        return None
    if args == ["--version"]:
        print(version_text())
        return None
    check_subcommand(args[0])
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
