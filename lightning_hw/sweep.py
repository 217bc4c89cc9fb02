"""`python -m lightning_hw sweep --config SWEEP.yaml`: hyper-parameter search over
a fit config (report 000's `find_best_net`), with Optuna.

A sweep YAML (configs/sweeps/) holds the options of `SweepSettings`: the base
fit config, the search space (dotted fit argument -> a list of values, or a
range `{low, high, log, step, num}`: `num` points of it for a grid, the range
itself for TPE), fixed fit arguments, sampler, n_trials, pruning, metric and
output_dir. Each is an option too (`--n_trials 8`); any other `--trainer.*`,
`--model.*`, `--data.*`, `--checkpoint.*`, `--plots.*` or `--seed_everything`
option goes to every trial's fit.

A trial is one in-process `fit` built by lightning_hw.cli (without its closing
test) in `OUTPUT_DIR/trial_NNNN`; it reports the metric to Optuna after each
validation, and its value is the best metric its checkpoint callback saw.
The trial command lines are parsed before anything starts. A mistake (a bad
setting, missing data in a trial) ends the sweep with one line on stderr
(lightning_hw.errors); one that stops it before any trial finished leaves no
output folder behind.

The study lives in the storage, so rerunning the same command resumes it:
finished trials are kept, and only the trials missing to `n_trials` (complete
or pruned) run. A trial whose process died stops sending heartbeats and runs
again with the same values once `grace_period` seconds have passed; machines
sharing a database as `--storage` share the sweep.

At the end: `OUTPUT_DIR/trials.csv` and a printed table sorted by the metric,
the best checkpoint copied to `OUTPUT_DIR/best.ckpt`, and its test accuracy
(the `test` subcommand's line).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import warnings
from argparse import ArgumentError
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from jsonargparse import ActionConfigFile, ArgumentParser
from jsonargparse.typing import NonNegativeInt, Path_fr, PositiveInt
from optuna.trial import FrozenTrial, TrialState
from pytorch_lightning import Callback, LightningModule, Trainer

from lightning_hw.callbacks import NonFiniteLossError
from lightning_hw.cli import PROGRAM, LightningHWCLI, first_missing_folder, resolve_config, run_command, write_table
from lightning_hw.errors import UsageError, innermost_reason, parse_error_parts, user_error

# Top-level keys of the fit parser: options under them go to every trial.
FIT_GROUPS = ("trainer", "model", "data", "checkpoint", "plots", "seed_everything")
RANGE_KEYS = {"low", "high", "log", "step", "num"}
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# The study remembers these; a rerun with other values is a different sweep.
IDENTITY_KEYS = ("search_space", "metric", "mode")


# ---------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class SearchParameter:
    """One searched fit argument: a list of values, or a range."""

    name: str
    values: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    num: int | None = None

    @classmethod
    def from_spec(cls, name: str, spec: Any) -> SearchParameter:
        where = f"search_space[{name!r}]"
        if not isinstance(name, str) or not name.strip() or name.split(".")[0] not in FIT_GROUPS:
            raise ValueError(f"{where}: a key must be a dotted fit argument under one of {FIT_GROUPS}")
        if isinstance(spec, list):
            if not spec:
                raise ValueError(f"{where}: the list of values is empty")
            values = tuple(_optuna_value(value) for value in spec)
            if len(set(map(json.dumps, values))) != len(values):
                raise ValueError(f"{where}: the values {spec} repeat")
            return cls(name, values=values)
        if not isinstance(spec, dict):
            raise ValueError(
                f"{where}: expected a list of values or a range {{low, high, log, step, num}}, got {spec!r}"
            )
        unknown = set(spec) - RANGE_KEYS
        if unknown or not {"low", "high"} <= set(spec):
            raise ValueError(f"{where}: a range has keys low, high and optionally log, step, num; got {sorted(spec)}")
        low, high, log, step, num = (spec.get(key) for key in ("low", "high", "log", "step", "num"))
        if not all(_is_number(bound) for bound in (low, high)) or not low < high:
            raise ValueError(f"{where}: a range needs numbers low < high, got low={low!r}, high={high!r}")
        if not isinstance(log or False, bool):
            raise ValueError(f"{where}: log must be true or false, got {log!r}")
        if log and low <= 0:
            raise ValueError(f"{where}: a log range needs low > 0, got {low}")
        if step is not None and (not _is_number(step) or step <= 0 or log):
            raise ValueError(f"{where}: step must be a positive number, and cannot go with log; got {step!r}")
        if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 2):
            raise ValueError(f"{where}: num must be an integer >= 2, got {num!r}")
        return cls(name, low=low, high=high, log=bool(log), step=step, num=num)

    @property
    def is_int(self) -> bool:
        return self.values is None and all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))

    def grid_values(self) -> tuple:
        """The values a grid takes: the list, or `num` points / `step` spacing over the range."""
        if self.values is not None:
            return self.values
        if self.num is not None:
            if self.log:
                ratio = math.log(self.high / self.low)
                points = [self.low * math.exp(ratio * i / (self.num - 1)) for i in range(self.num)]
            else:
                points = [self.low + (self.high - self.low) * i / (self.num - 1) for i in range(self.num)]
            points = [round(p) if self.is_int else float(f"{p:.6g}") for p in points]
            return tuple(dict.fromkeys(points))
        if self.step is not None or self.is_int:
            step = self.step or 1
            count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
            points = [self.low + i * step for i in range(count)]
            return tuple(points if self.is_int else (float(f"{p:.12g}") for p in points))
        raise ValueError(
            f"search_space[{self.name!r}]: a grid needs the values of a float range: give num (points) or step"
        )

    def check_values(self) -> tuple:
        """Values that exercise the parameter's types: the list, or the range's ends."""
        return self.values if self.values is not None else (self.low, self.high)

    def suggest(self, trial: optuna.Trial, grid: bool) -> Any:
        if grid or self.values is not None:
            return trial.suggest_categorical(self.name, self.grid_values() if grid else self.values)
        if self.is_int:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optuna_value(value: Any) -> Any:
    """A categorical value as Optuna stores it: scalars as they are, lists and dicts as JSON text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    raise ValueError(f"a search value must be a number, string, bool, null, list or mapping, got {value!r}")


def fit_option(name: str, value: Any) -> str:
    """`--name=value` in the form the fit parser reads back as the same value."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f"--{name}={text}"


def short_names(names: Sequence[str]) -> dict[str, str]:
    """Each dotted name's shortest tail (leaving out `init_args`) that no other name ends with, for tables."""
    reduced = {name: [part for part in name.split(".") if part != "init_args"] for name in names}
    short = {}
    for name, parts in reduced.items():
        for length in range(1, len(parts) + 1):
            tail = parts[-length:]
            if not any(other != name and others[-length:] == tail for other, others in reduced.items()):
                break
        short[name] = ".".join(tail)
    return short


# ---------------------------------------------------------------------------
# Settings


@dataclass
class SweepSettings:
    """What one sweep runs: the options of `python -m lightning_hw sweep` (and the keys of a sweep YAML).

    Args:
        base_config: The fit config every trial starts from (in a YAML: relative to it), or a shipped config's
            name (`cifar10_twolayer`).
        search_space: Dotted fit argument -> a list of values, or a range {low, high, log, step, num}.
        output_dir: Where the trials, trials.csv, best.ckpt and (by default) sweep.db go.
        fit_args: Dotted fit argument -> value, the same for every trial.
        sampler: grid (every point once) or tpe.
        n_trials: Trials in all, complete or pruned (grid: default every point).
        pruning: Stop a trial below the median of the complete ones at the same validation.
        pruning_startup_trials: Complete trials before any is pruned.
        pruning_warmup: Validations of a trial before it may be pruned.
        metric: The metric logged at validation that ranks trials.
        mode: Whether a higher (max) or lower (min) metric is better.
        storage: Optuna storage URL (default sqlite:///OUTPUT_DIR/sweep.db); a shared database spreads a sweep
            over machines.
        study_name: The study's name in the storage (default: output_dir's last part).
        seed: Seeds the sampler (TPE: plus the number of trials so far, so a resumed sweep draws anew).
        heartbeat_interval: Seconds between a running trial's heartbeats.
        grace_period: Seconds without a heartbeat after which a running trial counts as dead and is run again.
        test_best: Test the best checkpoint at the end.
    """

    base_config: Path_fr | str
    search_space: dict[str, Any]
    output_dir: str
    fit_args: dict[str, Any] = field(default_factory=dict)
    sampler: Literal["grid", "tpe"] = "grid"
    n_trials: PositiveInt | None = None
    pruning: bool = False
    pruning_startup_trials: NonNegativeInt = 3
    pruning_warmup: NonNegativeInt = 0
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    storage: str | None = None
    study_name: str | None = None
    seed: int = 0
    heartbeat_interval: PositiveInt = 10
    grace_period: PositiveInt = 30
    test_best: bool = True
    # Options given on the command line for every trial's fit, verbatim (not a sweep option).
    passthrough: list[str] = field(default_factory=list)
    parameters: list[SearchParameter] = field(init=False)

    def __post_init__(self) -> None:
        if not self.search_space:
            raise ValueError("search_space is empty: name at least one fit argument to search")
        self.parameters = [SearchParameter.from_spec(name, spec) for name, spec in self.search_space.items()]
        for name in self.fit_args:
            if name in self.search_space:
                raise ValueError(f"fit_args[{name!r}] is also in search_space: give it in one place")
        for option in self.passthrough:
            if option.startswith("--") and option[2:].split("=", 1)[0] in self.search_space:
                raise ValueError(f"{option} sets a searched argument: remove it, or take it out of search_space")
        if self.sampler == "grid":
            grid_size = math.prod(len(parameter.grid_values()) for parameter in self.parameters)
            if self.n_trials is not None and self.n_trials > grid_size:
                raise ValueError(f"n_trials={self.n_trials} exceeds the grid's {grid_size} points")
            self.n_trials = self.n_trials or grid_size
        elif self.n_trials is None:
            raise ValueError(f"sampler {self.sampler!r} needs n_trials")
        self.base_config = Path(resolve_config(str(getattr(self.base_config, "absolute", self.base_config)))).resolve()
        self.output_dir = Path(self.output_dir)
        self.storage = self.storage or f"sqlite:///{self.output_dir.resolve() / 'sweep.db'}"
        self.study_name = self.study_name or self.output_dir.resolve().name

    def identity(self) -> dict[str, Any]:
        return json.loads(json.dumps({key: getattr(self, key) for key in IDENTITY_KEYS}))

    def fit_arguments(self, subcommand: str, values: dict[str, Any], run_dir: Path) -> list[str]:
        """The `fit` (or `test`) command line of a trial with these searched values."""
        return [
            subcommand, "--config", str(self.base_config),
            *(fit_option(name, value) for name, value in self.fit_args.items()),
            *self.passthrough,
            *(fit_option(name, value) for name, value in values.items()),
            f"--trainer.default_root_dir={run_dir}",
            f"--checkpoint.monitor={self.metric}", f"--checkpoint.mode={self.mode}",
        ]  # fmt: skip


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=f"{PROGRAM} sweep",
        description="Hyper-parameter search over a fit config; other --trainer.*, --model.*, --data.*, "
        "--checkpoint.*, --plots.* or --seed_everything options go to every trial's fit.",
        exit_on_error=False,  # a mistake is raised, and reported in one line by lightning_hw.cli.main
        allow_abbrev=False,  # as the other subcommands: `-c`/`--config` only
    )
    parser.add_argument(
        "-c", "--config", action=ActionConfigFile, help="The sweep YAML (a file, or a shipped sweep's name)."
    )
    parser.add_class_arguments(SweepSettings, skip={"passthrough"})
    return parser


def parse_settings(args: Sequence[str]) -> SweepSettings:
    """Split the fit options from the sweep's own, parse the latter; a mistake is a UsageError."""
    own, passthrough = [], []
    tokens = list(args)
    while tokens:
        token = tokens.pop(0)
        if token.startswith("--") and token[2:].split("=", 1)[0].split(".")[0] in FIT_GROUPS:
            passthrough.append(token)
            if "=" not in token and tokens and not tokens[0].startswith("--"):
                passthrough.append(tokens.pop(0))
        else:
            own.append(token)
    try:
        config = build_parser().parse_args(own).as_dict()
    except ArgumentError as error:
        raise UsageError(*parse_error_parts(str(error))) from error
    sweep_files = config.pop("config", None) or []
    try:
        return SweepSettings(**config, passthrough=passthrough)
    except ValueError as error:
        where = str(getattr(sweep_files[-1], "relative", sweep_files[-1])) if sweep_files else None
        raise UsageError("invalid sweep settings", where, str(error)) from error


# ---------------------------------------------------------------------------
# Trials


class TrialPruning(Callback):
    """Reports the metric to the Optuna trial after each validation; stops the fit when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.validations = 0
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "nothing"
            raise UsageError(
                "the sweep's metric was not logged at validation", self.metric, f"choose one of the logged: {logged}"
            )
        step, self.validations = self.validations, self.validations + 1
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            self.pruned_at = step
            trainer.should_stop = True


class FitOnlyCLI(LightningHWCLI):
    """The CLI with only its `fit` parser (building all four takes most of a small trial's set-up)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": LightningHWCLI.subcommands()["fit"]}


class TrialCLI(FitOnlyCLI):
    """One trial's `fit`: extra trainer callbacks, one device by default, and no test at the
    end (the sweep tests its best trial)."""

    def __init__(self, *args: Any, trial_callbacks: Sequence[Callback], **kwargs: Any) -> None:
        defaults = {"devices": 1, **(kwargs.pop("trainer_defaults", None) or {})}
        given = defaults.get("callbacks") or []
        defaults["callbacks"] = [*(given if isinstance(given, list) else [given]), *trial_callbacks]
        super().__init__(*args, trainer_defaults=defaults, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.world_size > 1:
            raise ValueError(
                f"a sweep trial runs inside the sweep's process, on one device; got {trainer.world_size} processes. "
                "For several devices run one sweep per device (--trainer.devices=[N]) on a shared --storage"
            )
        return trainer

    def fit(self, model: LightningModule, **kwargs: Any) -> None:
        kwargs.update(weights_only=True)
        self.divergence: str | None = None
        try:
            self.trainer.fit(model, **kwargs)
        except NonFiniteLossError as error:
            # A diverged trial is a bad trial, not a broken sweep: it is pruned and the sweep goes on.
            self.divergence = str(error)


def run_cli(arguments: list[str], cli_class: Callable[..., LightningHWCLI] = LightningHWCLI) -> LightningHWCLI:
    """A `python -m lightning_hw` command line run in this process; a user's mistake is raised."""
    with warnings.catch_warnings():
        # LightningCLI warns when given args while sys.argv holds the sweep's own command line.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter", category=UserWarning)
        return run_command(arguments, cli_class=cli_class)


class _ArgumentsParsed(Exception):
    """Raised by ArgumentCheckCLI once the arguments have parsed; carries its parser."""


class ArgumentCheckCLI(FitOnlyCLI):
    """Parses a command line with the fit parser, raising its error, and builds nothing."""

    def before_instantiate_classes(self) -> None:
        raise _ArgumentsParsed(self.parser)


def check_arguments(settings: SweepSettings) -> None:
    """Parse trial command lines (every listed value and range end in some trial) before starting."""
    checks = max(len(parameter.check_values()) for parameter in settings.parameters)
    parser = None
    for index in range(checks):
        values = {p.name: p.check_values()[min(index, len(p.check_values()) - 1)] for p in settings.parameters}
        arguments = settings.fit_arguments("fit", values, settings.output_dir / "check")
        try:
            if parser is None:
                run_cli(arguments, cli_class=ArgumentCheckCLI)
            else:  # the first check's parser: building one takes longer than parsing
                parser.parse_args(arguments)
        except _ArgumentsParsed as parsed:
            parser = parsed.args[0]
        except Exception as error:
            reason = str(error) if isinstance(error, UsageError) else innermost_reason(str(error))
            raise UsageError("the fit parser rejects a trial's arguments", " ".join(arguments[3:]), reason) from error


def run_trial(trial: optuna.Trial, settings: SweepSettings) -> float:
    """Optuna's objective: one fit with the trial's values; its best metric."""
    grid = settings.sampler == "grid"
    values = {parameter.name: parameter.suggest(trial, grid) for parameter in settings.parameters}
    run_dir = settings.output_dir / f"trial_{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    pruning = TrialPruning(trial, settings.metric)
    cli = run_cli(
        settings.fit_arguments("fit", values, run_dir),
        cli_class=functools.partial(TrialCLI, trial_callbacks=[pruning]),
    )
    if cli.divergence is not None:
        trial.set_user_attr("diverged", cli.divergence)
        raise optuna.TrialPruned(f"the training loss diverged: {cli.divergence}")
    checkpoint = cli.trainer.checkpoint_callback
    if checkpoint is None or not checkpoint.best_model_path or checkpoint.best_model_score is None:
        raise UsageError(
            "a trial saved no checkpoint",
            f"trial {trial.number}",
            "the sweep ranks the trials by their checkpoints: leave checkpointing on, without fast_dev_run, "
            "and let validation run",
        )
    trial.set_user_attr("checkpoint", checkpoint.best_model_path)
    if pruning.pruned_at is not None:
        raise optuna.TrialPruned(f"pruned after validation {pruning.pruned_at}")
    return float(checkpoint.best_model_score)


# ---------------------------------------------------------------------------
# The study


def open_study(settings: SweepSettings) -> optuna.Study:
    """Create or resume the study, checking that a resumed one is the same sweep."""
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            settings.storage,
            heartbeat_interval=settings.heartbeat_interval,
            grace_period=settings.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    study = optuna.create_study(
        storage=storage,
        study_name=settings.study_name,
        direction="maximize" if settings.mode == "max" else "minimize",
        load_if_exists=True,
    )
    identity = settings.identity()
    stored = study.user_attrs.get("sweep")
    if stored is None:
        study.set_user_attr("sweep", identity)
    elif stored != identity:
        changed = [key for key in IDENTITY_KEYS if stored.get(key) != identity[key]]
        raise UsageError(
            f"study {settings.study_name!r} was started with another {', '.join(changed)}: "
            f"{json.dumps({key: stored.get(key) for key in changed})}",
            settings.storage,
            "give another --output_dir or --study_name",
        )
    if settings.sampler == "grid":
        # The seed orders the grid points, which trials name by index: it must stay the same.
        grid = {parameter.name: list(parameter.grid_values()) for parameter in settings.parameters}
        study.sampler = optuna.samplers.GridSampler(grid, seed=settings.seed)
    else:
        # A fresh seed per resume, so a resumed TPE does not replay the first run's draws.
        study.sampler = optuna.samplers.TPESampler(seed=settings.seed + len(study.trials))
    if settings.pruning:
        study.pruner = optuna.pruners.MedianPruner(
            n_startup_trials=settings.pruning_startup_trials, n_warmup_steps=settings.pruning_warmup
        )
    else:
        study.pruner = optuna.pruners.NopPruner()
    return study


def trial_metric(trial: FrozenTrial, mode: str) -> float | None:
    """A complete trial's value; a pruned trial's best reported value."""
    if trial.state == TrialState.COMPLETE:
        return trial.value
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        return (max if mode == "max" else min)(trial.intermediate_values.values())
    return None


def table_rows(study: optuna.Study, settings: SweepSettings) -> list[dict[str, Any]]:
    """One row per trial: finished trials by metric (best first), then the others by number."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        seconds = (
            (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start
            else None
        )
        row = {"trial": trial.number, "state": trial.state.name}
        row.update({parameter.name: trial.params.get(parameter.name) for parameter in settings.parameters})
        row[settings.metric] = trial_metric(trial, settings.mode)
        row["seconds"] = None if seconds is None else round(seconds, 1)
        row["checkpoint"] = trial.user_attrs.get("checkpoint", "")
        rows.append(row)
    sign = -1.0 if settings.mode == "max" else 1.0

    def order(row: dict[str, Any]) -> tuple:
        value = row[settings.metric]
        return (value is None, sign * value if value is not None else 0.0, row["trial"])

    return sorted(rows, key=order)


def format_table(rows: list[dict[str, Any]], settings: SweepSettings) -> str:
    names = short_names([parameter.name for parameter in settings.parameters])
    columns = ["trial", "state", *names, settings.metric, "seconds"]
    headers = ["trial", "state", *names.values(), settings.metric, "seconds"]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.6g}" if isinstance(value, float) else str(value)

    lines = [headers] + [[cell(row[column]) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in lines)


def trial_line(trial: FrozenTrial, settings: SweepSettings) -> str:
    names = short_names([parameter.name for parameter in settings.parameters])
    parts = [f"trial {trial.number} {trial.state.name.lower()}"]
    parts += [f"{names[name]} {value}" for name, value in trial.params.items() if name in names]
    metric = trial_metric(trial, settings.mode)
    if metric is not None:
        parts.append(f"{settings.metric} {metric:.4f}")
    return " | ".join(parts)


def copy_checkpoint(source: str, target: Path) -> Path:
    """Copy via a temporary file, so `target` is always a whole checkpoint."""
    temporary = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)
    return target


@dataclass
class SweepResult:
    study: optuna.Study
    rows: list[dict[str, Any]]
    table_path: Path
    best_checkpoint: Path | None
    ran: int  # trials run by this call


class _UserErrorLogFilter(logging.Filter):
    """Drops Optuna's two lines on a trial that failed on a user's mistake (the first with its
    traceback): the mistake ends the sweep and `lightning_hw.cli.main` reports it, in one line."""

    _drop_value_line = False

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and user_error(error) is not None:
            self._drop_value_line = True  # "Trial N failed with value None." follows
            return False
        if self._drop_value_line and " failed with value " in record.getMessage():
            self._drop_value_line = False
            return False
        return True


@contextlib.contextmanager
def _output_removed_on_mistake(settings: SweepSettings) -> Iterator[None]:
    """A sweep that stops on a user's mistake before any trial finished leaves no output folder
    behind (when this call made it)."""
    created = first_missing_folder(settings.output_dir)
    log_filter = _UserErrorLogFilter()
    optimize_logger = logging.getLogger("optuna.study._optimize")
    optimize_logger.addFilter(log_filter)
    try:
        yield
    except Exception as error:
        if created is not None and created.exists() and user_error(error) is not None and not _any_finished(settings):
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        optimize_logger.removeFilter(log_filter)


def _any_finished(settings: SweepSettings) -> bool:
    try:
        study = optuna.load_study(study_name=settings.study_name, storage=settings.storage)
    except KeyError:  # the study was never created
        return False
    return bool(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def run_sweep(settings: SweepSettings) -> SweepResult:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_arguments(settings)
    with _output_removed_on_mistake(settings):
        return _run_study(settings)


def _run_study(settings: SweepSettings) -> SweepResult:
    study = open_study(settings)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED_STATES))
    remaining = max(0, settings.n_trials - finished)
    print(f"sweep {settings.study_name}: {finished} of {settings.n_trials} trials finished, {remaining} to run")
    before = len(study.trials)
    if remaining:
        study.optimize(
            functools.partial(run_trial, settings=settings),
            n_trials=remaining,
            callbacks=[lambda study, trial: print(trial_line(trial, settings), flush=True)],
            gc_after_trial=True,
        )
    rows = table_rows(study, settings)
    table_path = settings.output_dir / "trials.csv"
    write_table(rows, table_path)
    counts = {state: sum(row["state"] == state.name for row in rows) for state in TrialState}
    summary = ", ".join(f"{count} {state.name.lower()}" for state, count in counts.items() if count)
    print(f"sweep {settings.study_name}: {len(rows)} trials ({summary}) | table: {table_path}")
    print(format_table(rows, settings))
    best_checkpoint = None
    if counts[TrialState.COMPLETE]:
        best = study.best_trial
        if not Path(best.user_attrs["checkpoint"]).is_file():  # a trial another machine ran
            print(f"best: {trial_line(best, settings)} | checkpoint {best.user_attrs['checkpoint']} is elsewhere")
            return SweepResult(study, rows, table_path, None, ran=len(study.trials) - before)
        best_checkpoint = copy_checkpoint(best.user_attrs["checkpoint"], settings.output_dir / "best.ckpt")
        print(f"best: {trial_line(best, settings)} | checkpoint: {best_checkpoint}")
        if settings.test_best:
            arguments = settings.fit_arguments("test", best.params, settings.output_dir / "best")
            run_cli([*arguments, f"--ckpt_path={best_checkpoint}"])
    return SweepResult(study, rows, table_path, best_checkpoint, ran=len(study.trials) - before)


def main(args: Sequence[str]) -> SweepResult:
    """`python -m lightning_hw sweep ARGS`."""
    return run_sweep(parse_settings(args))
