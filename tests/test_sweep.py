"""`python -m lightning_hw sweep`: grid and TPE searches with pruning on generated
CIFAR-10, resuming after an interruption, and bad sweep YAMLs."""

from __future__ import annotations

import csv
import re
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml

from fakes import write_cifar10
from lightning_hw import sweep
from lightning_hw.callbacks import plots
from lightning_hw.cli import CONFIG_DIR, main, resolve_config
from lightning_hw.sweep import SearchParameter, parse_settings, short_names

SWEEP_CONFIGS = sorted((CONFIG_DIR / "sweeps").glob("*.yaml"))
HIDDEN = "model.init_args.hidden_size"
LR = "model.init_args.optimizer.init_args.lr"
# Small trials: 120 training images in batches of 30, one epoch, torch's default
# initialisation (the report's 1e-4 learns nothing in 4 steps), no progress output.
FAST_FIT = {
    "trainer.max_steps": -1,
    "trainer.max_epochs": 1,
    "trainer.num_sanity_val_steps": 0,
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
    "data.init_args.batch_size": 30,
    "data.init_args.val_size": 30,
    "model.init_args.init_std": None,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar")).parent


@pytest.fixture(autouse=True)
def no_png_rendering(monkeypatch):
    """Trials draw their plots but skip rendering the PNGs (tests/test_callbacks.py covers
    them): most of a tiny trial's time."""
    monkeypatch.setattr(plots, "_save", lambda figure, path: figure.clear())


def write_sweep(path: Path, **settings) -> Path:
    config = {
        "base_config": str(CONFIG_DIR / "cifar10_twolayer.yaml"),
        "output_dir": str(path.parent / "out"),
        "fit_args": FAST_FIT,
        "search_space": {HIDDEN: [4, 8], LR: [0.01, 0.5]},
        **settings,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_sweep(config: Path, data_dir: Path, *options: str) -> sweep.SweepResult:
    return main(["sweep", "--config", str(config), f"--data.init_args.data_dir={data_dir}", *options])


def sweep_error(capsys, config: Path, data_dir: Path, *options: str) -> tuple[int, str]:
    """(exit status, stderr) of a sweep that stops on a mistake."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_sweep(config, data_dir, *options)
    return exit_info.value.code, capsys.readouterr().err


def read_table(result: sweep.SweepResult) -> list[dict[str, str]]:
    return list(csv.DictReader(result.table_path.open()))


def test_grid_runs_every_point_and_keeps_the_best(tmp_path, data_dir, capsys):
    space = {HIDDEN: [4, 8], LR: {"low": 0.01, "high": 1.0, "log": True, "num": 2}}
    result = run_sweep(write_sweep(tmp_path / "grid.yaml", search_space=space), data_dir)
    output = capsys.readouterr().out

    assert result.ran == 4
    trials = result.study.trials
    assert {(t.params[HIDDEN], t.params[LR]) for t in trials} == {(4, 0.01), (4, 1.0), (8, 0.01), (8, 1.0)}
    rows = read_table(result)
    assert [row["state"] for row in rows] == ["COMPLETE"] * 4
    accuracies = [float(row["val_acc"]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert accuracies[0] == pytest.approx(result.study.best_value)
    for row in rows:  # each trial's value is the best val_acc its fit logged
        metrics = list(csv.DictReader((Path(row["checkpoint"]).parents[1] / "metrics.csv").open()))
        assert float(row["val_acc"]) == pytest.approx(max(float(m["val_acc"]) for m in metrics if m["val_acc"]))

    # The printed table lists the trials in the CSV's order.
    table = output[output.index("trial  state") :].splitlines()[1:5]
    assert [line.split()[0] for line in table] == [row["trial"] for row in rows]

    best = torch.load(result.best_checkpoint, weights_only=True)
    best_trial = result.study.best_trial
    assert best["hyper_parameters"]["hidden_size"] == best_trial.params[HIDDEN]
    source = torch.load(best_trial.user_attrs["checkpoint"], weights_only=True)
    assert all(torch.equal(best["state_dict"][k], v) for k, v in source["state_dict"].items())
    test_line = next(line for line in output.splitlines() if line.startswith("test accuracy: "))
    assert f"checkpoint: {result.best_checkpoint}" in test_line


def test_tpe_with_pruning_prunes_a_trial(tmp_path, data_dir):
    config = write_sweep(
        tmp_path / "tpe.yaml",
        sampler="tpe",
        n_trials=3,
        pruning=True,
        pruning_startup_trials=1,
        seed=1,  # draws a learning rate that learns, then two that do not
        search_space={HIDDEN: {"low": 4, "high": 12, "step": 4}, LR: {"low": 1.0e-4, "high": 2.0, "log": True}},
        fit_args={**FAST_FIT, "trainer.max_epochs": 2},
    )
    result = run_sweep(config, data_dir, "--test_best=false")
    trials = {t.number: t for t in result.study.trials}
    pruned = [t for t in trials.values() if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in trials.values() if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == 3
    for trial in complete:
        assert len(trial.intermediate_values) == 2
        assert trial.params[HIDDEN] in (4, 8, 12) and 1.0e-4 <= trial.params[LR] <= 2.0
    for trial in pruned:  # stopped after its first validation, below the median of the complete trials before it
        assert list(trial.intermediate_values) == [0]
        earlier = [t.intermediate_values[0] for t in complete if t.number < trial.number]
        assert trial.intermediate_values[0] < np.percentile(earlier, 50)
    rows = {int(row["trial"]): row for row in read_table(result)}
    assert {rows[t.number]["state"] for t in pruned} == {"PRUNED"}
    assert float(rows[pruned[0].number]["val_acc"]) == pytest.approx(pruned[0].intermediate_values[0])


class SimulatedKill(BaseException):
    """The process dying in the middle of a trial (neither an Exception nor a KeyboardInterrupt)."""


def test_resume_runs_only_missing_trials_and_reruns_a_killed_one(tmp_path, data_dir, monkeypatch, capsys):
    config = write_sweep(tmp_path / "resume.yaml", fit_args=FAST_FIT)
    options = ["--test_best=false", "--heartbeat_interval=1", "--grace_period=1"]
    first = run_sweep(config, data_dir, "--n_trials=2", *options)
    assert first.ran == 2

    report = sweep.TrialPruning.on_validation_end

    def killed(self, trainer, pl_module):
        report(self, trainer, pl_module)
        raise SimulatedKill

    monkeypatch.setattr(sweep.TrialPruning, "on_validation_end", killed)
    with pytest.raises(SimulatedKill):
        run_sweep(config, data_dir, "--n_trials=3", *options)
    monkeypatch.undo()
    storage = f"sqlite:///{tmp_path / 'out' / 'sweep.db'}"
    study = optuna.load_study(study_name="out", storage=storage)
    killed_trial = study.trials[2]
    assert killed_trial.state == optuna.trial.TrialState.RUNNING

    time.sleep(2.5)  # the killed trial's heartbeat is now older than the grace period
    resumed = run_sweep(config, data_dir, "--n_trials=4", *options)
    states = [t.state for t in resumed.study.trials]
    assert resumed.ran == 2  # the killed trial again, and the last grid point
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4
    assert resumed.study.trials[2].state == optuna.trial.TrialState.FAIL
    rerun = next(t for t in resumed.study.trials if t.system_attrs.get("failed_trial") == 2)
    assert rerun.state == optuna.trial.TrialState.COMPLETE and rerun.params == killed_trial.params
    finished = [t for t in resumed.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {(t.params[HIDDEN], t.params[LR]) for t in finished} == {(4, 0.01), (4, 0.5), (8, 0.01), (8, 0.5)}

    assert run_sweep(config, data_dir, *options).ran == 0  # all done: nothing reruns
    changed = write_sweep(tmp_path / "resume.yaml", search_space={HIDDEN: [4, 16]})
    status, error = sweep_error(capsys, changed, data_dir, *options)
    assert status == 2 and "was started with another search_space" in error


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"search_space": {}}, "search_space is empty"),
        ({"search_space": {HIDDEN: []}}, "list of values is empty"),
        ({"search_space": {"hidden_size": [4]}}, "dotted fit argument"),
        ({"search_space": {"model.init_args.reg": {"low": 1.0, "high": 0.0}}}, "low < high"),
        ({"search_space": {"model.init_args.reg": {"low": 0.0, "high": 1.0, "log": True}}}, "low > 0"),
        ({"search_space": {"model.init_args.reg": {"low": 0.0, "high": 1.0, "lg": True}}}, "optionally log"),
        ({"search_space": {"model.init_args.reg": {"low": 0.0, "high": 1.0}}}, "give num"),
        ({"search_space": {HIDDEN: [4, 4]}}, "repeat"),
        ({"search_space": {"model.init_args.hiden_size": [4, 8]}}, "hiden_size"),
        ({"search_space": {HIDDEN: [4, "wide"]}}, "fit parser rejects"),
        ({"sampler": "tpe"}, "needs n_trials"),
        ({"n_trials": 5}, "exceeds the grid's 4 points"),
        ({"fit_args": {HIDDEN: 4}}, "in one place"),
    ],
)
def test_bad_sweep_yaml_is_a_clear_error(tmp_path, data_dir, settings, message, capsys):
    config = write_sweep(tmp_path / "bad.yaml", **settings)
    status, error = sweep_error(capsys, config, data_dir)
    assert status == 2 and error.startswith("error: ") and len(error.splitlines()) == 1
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()  # nothing started


def test_sweep_options_are_checked_by_the_parser(tmp_path, data_dir, capsys):
    config = write_sweep(tmp_path / "bad.yaml", base_config=str(tmp_path / "missing.yaml"))
    with pytest.raises(SystemExit) as exit_info:
        run_sweep(config, data_dir)
    assert exit_info.value.code != 0 and "missing.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_sweep(write_sweep(tmp_path / "bad.yaml", sampler="random"), data_dir)
    config = write_sweep(tmp_path / "ok.yaml")
    status, error = sweep_error(capsys, config, data_dir, f"--{HIDDEN}=16")
    assert status == 2 and "sets a searched argument" in error
    # DDP would start the whole sweep again per process.
    status, error = sweep_error(capsys, config, data_dir, "--trainer.accelerator=cpu", "--trainer.devices=2")
    assert status == 2 and "one device" in error


@pytest.mark.parametrize("config", SWEEP_CONFIGS, ids=[path.name for path in SWEEP_CONFIGS])
def test_each_sweep_config_parses_against_its_base_config(config):
    settings = parse_settings(["--config", str(config)])
    assert settings.base_config.is_file()
    sweep.check_arguments(settings)
    assert settings.n_trials >= 2


def test_shipped_configs_are_named_without_a_path(tmp_path):
    settings = parse_settings(["--config", resolve_config("sweeps/cifar10_twolayer_grid")])
    assert settings.base_config == (CONFIG_DIR / "cifar10_twolayer.yaml").resolve()
    by_name = write_sweep(tmp_path / "by_name.yaml", base_config="cifar10_twolayer_first")
    assert parse_settings(["--config", str(by_name)]).base_config == (CONFIG_DIR / "cifar10_twolayer_first.yaml").resolve()


def test_search_parameter_values_and_table_names():
    assert SearchParameter.from_spec(HIDDEN, {"low": 100, "high": 300, "step": 100}).grid_values() == (100, 200, 300)
    log_range = SearchParameter.from_spec(LR, {"low": 1e-3, "high": 1e-1, "log": True, "num": 3})
    assert log_range.grid_values() == pytest.approx((1e-3, 1e-2, 1e-1))
    assert SearchParameter.from_spec(LR, {"low": 0.0, "high": 1.0, "num": 3}).grid_values() == (0.0, 0.5, 1.0)
    assert SearchParameter.from_spec(HIDDEN, [[128], [256, 64]]).grid_values() == ("[128]", "[256, 64]")
    assert sweep.fit_option(HIDDEN, 1e-7) == f"--{HIDDEN}=1e-07"
    names = [LR, "model.init_args.lr_scheduler.init_args.gamma", "data.init_args.lr", HIDDEN]
    assert list(short_names(names).values()) == ["optimizer.lr", "gamma", "data.lr", "hidden_size"]


def test_a_diverging_trial_is_pruned_and_the_sweep_goes_on(tmp_path, data_dir, capsys):
    # lr 1e12 makes the first step's loss infinite: FiniteLossCheck stops that trial only.
    space = {HIDDEN: [8], LR: [0.05, 1.0e12]}
    result = run_sweep(write_sweep(tmp_path / "diverge.yaml", search_space=space), data_dir, "--test_best=false")
    states = {t.params[LR]: t.state for t in result.study.trials}
    assert states == {0.05: optuna.trial.TrialState.COMPLETE, 1.0e12: optuna.trial.TrialState.PRUNED}
    diverged = next(t for t in result.study.trials if t.params[LR] == 1.0e12)
    assert "learning rate" in diverged.user_attrs["diverged"]
    assert result.best_checkpoint is not None and result.best_checkpoint.is_file()
