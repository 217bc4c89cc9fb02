"""`python -m lightning_hw`: every config on generated data, the default run,
and validate/test/predict from a saved checkpoint."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

import lightning_hw
from fakes import write_cifar10, write_fer2013_csv, write_fruits
from fits import assert_fast_dev_fit, run_summary
from lightning_hw.callbacks import plots
from lightning_hw.cli import CONFIG_DIR, DEFAULT_CONFIG, _with_config_paths, main
from lightning_hw.models.transfer import MissingDependency, import_timm, import_torchvision

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Generated data for each config's DataModule, and the overrides that fit it.
CONFIG_DATA = {
    "cifar10_twolayer_first.yaml": (lambda root: write_cifar10(root).parent, ["--data.val_size=10"]),
    "cifar10_twolayer.yaml": (lambda root: write_cifar10(root).parent, ["--data.val_size=10"]),
    "fruits_cnn.yaml": (lambda root: write_fruits(root, size=32), []),
    "fer2013_cnn.yaml": (lambda root: write_fer2013_csv(root).parent, ["--data.batch_size=8"]),
    "fer2013_cnn_small.yaml": (lambda root: write_fer2013_csv(root).parent, []),
}


# Fit configs whose fit test lives in tests/test_transfer.py, and the optional library each needs
# (without it, that test skips).
FIT_ELSEWHERE = {"cifar10_transfer.yaml": import_torchvision, "cifar10_transfer_lite0.yaml": import_timm}


def test_every_config_is_covered():
    configs = {path.name for path in CONFIG_DIR.glob("*.yaml")}
    assert configs == set(CONFIG_DATA) | {DEFAULT_CONFIG.name} | set(FIT_ELSEWHERE)
    not_covered = {}
    for config, import_library in FIT_ELSEWHERE.items():
        try:
            import_library()
        except MissingDependency as error:  # a broken install raises instead
            not_covered[config] = str(error)
    if not_covered:
        reasons = "; ".join(f"{config}: {reason}" for config, reason in sorted(not_covered.items()))
        pytest.skip(f"{len(configs) - len(not_covered)} of {len(configs)} configs covered here, not {reasons}")


@pytest.mark.parametrize("config", sorted(CONFIG_DATA))
def test_each_config_fits_on_generated_data(config, tmp_path, capsys):
    write_data, overrides = CONFIG_DATA[config]
    data_dir = write_data(tmp_path / "data")
    cli = main(["fit", "--config", str(CONFIG_DIR / config), f"--data.data_dir={data_dir}",
                f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.fast_dev_run=true",
                "--trainer.enable_progress_bar=false", *overrides])  # fmt: skip
    model_class = yaml.safe_load((CONFIG_DIR / config).read_text())["model"]["class_path"].rsplit(".", 1)[1]
    assert_fast_dev_fit(cli, capsys.readouterr().out, model_class)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """A short default `fit` (no config given): bundled digits, two epochs of a few batches."""
    root = tmp_path_factory.mktemp("default_run")
    args = ["fit", f"--trainer.default_root_dir={root}", "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=5", "--trainer.enable_progress_bar=false"]  # fmt: skip
    import contextlib
    import io

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        main(args)
    return root, run_summary(output.getvalue())


def test_default_fit_trains_tests_and_reports(default_run):
    root, summary = default_run
    accuracy = float(summary["test accuracy"].rstrip("%"))
    # Ten batches reach about 70% on digits; a model that does not learn stays near 10%.
    assert 50.0 < accuracy <= 100.0
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.is_file() and checkpoint.name.startswith("best-")
    run_dir = Path(summary["logs"])
    assert run_dir.is_relative_to(root)
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "config.yaml").is_file()
    assert (checkpoint.parent / "last.ckpt").is_file()
    plots = Path(summary["plots"])
    for name in ("loss.png", "accuracy.png", "confusion_matrix_val.png", "confusion_matrix_test.png",
                 "first_layer_weights.png"):  # fmt: skip
        assert (plots / name).read_bytes()[:8] == PNG_SIGNATURE, name
    checkpoint_data = torch.load(checkpoint, weights_only=True)
    assert checkpoint_data["hyper_parameters"]["_class_path"] == "lightning_hw.models.FruitCNN"


@pytest.mark.parametrize("subcommand, label", [("validate", "validation accuracy"), ("test", "test accuracy")])
def test_validate_and_test_from_checkpoint(default_run, subcommand, label, tmp_path, capsys):
    root, summary = default_run
    main([subcommand, f"--ckpt_path={summary['checkpoint']}", f"--trainer.default_root_dir={tmp_path}",
          "--trainer.enable_progress_bar=false"])  # fmt: skip
    reported = run_summary(capsys.readouterr().out)
    if subcommand == "test":
        assert reported[label] == summary["test accuracy"]  # the same weights give the same accuracy
    assert 50.0 < float(reported[label].rstrip("%")) <= 100.0  # the trained weights, not fresh ones


def test_predict_from_checkpoint_writes_class_predictions(default_run, tmp_path, capsys):
    _, summary = default_run
    main(["predict", f"--ckpt_path={summary['checkpoint']}", f"--trainer.default_root_dir={tmp_path}",
          "--trainer.enable_progress_bar=false"])  # fmt: skip
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("predictions:"))
    path = Path(line.rsplit(" written to ", 1)[1])
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 359  # the digits test split: round(0.2 * 1,797)
    assert all(row["class_name"] == row["class_index"] for row in rows)  # digit classes are named "0".."9"
    assert len({row["class_index"] for row in rows}) > 1


def test_print_config_and_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG_DIR / "fruits_cnn.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "lightning_hw.models.FruitCNN" in printed and "6728" not in printed
    assert "num_classes" in printed or "class_path" in printed
    main(["--version"])
    release = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]
    kernels = "CPU and CUDA" if lightning_hw.has_cuda_kernels() else "CPU"
    assert lightning_hw.__version__ == release
    assert capsys.readouterr().out == f"lightning_hw {release} (torch {torch.__version__}; {kernels} kernels)\n"


def test_bad_option_is_an_error_not_a_crash(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.init_args.hidden_sizes=not-a-list", "--trainer.fast_dev_run=true"])
    assert exit_info.value.code != 0


def test_python_dash_m_runs_the_cli(tmp_path):
    """The module entry point, in a real subprocess, offline, on the bundled digits."""
    result = subprocess.run(
        [sys.executable, "-m", "lightning_hw", "fit", "--trainer.fast_dev_run=true",
         f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = run_summary(result.stdout)
    assert 0.0 <= float(summary["test accuracy"].rstrip("%")) <= 100.0  # one step: any accuracy
    assert Path(summary["logs"]).is_relative_to(tmp_path)


# -- issue 23: last.ckpt, -c, help --------------------------------------------------------------------


@pytest.fixture
def no_png_rendering(monkeypatch):
    """Plots are drawn but not rendered to PNG (test_default_fit_trains_tests_and_reports checks them)."""
    monkeypatch.setattr(plots, "_save", lambda figure, path: figure.clear())


def test_last_checkpoint_holds_the_last_epoch_and_resume_goes_on_after_it(tmp_path, no_png_rendering):
    """The monitored best is epoch 0 (`epoch`, mode min: a later epoch never improves on it); last.ckpt
    must still follow every epoch, and `--ckpt_path last` resume after the third."""
    args = [f"--trainer.default_root_dir={tmp_path}", "--checkpoint.monitor=epoch", "--checkpoint.mode=min",
            "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=1",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false"]  # fmt: skip
    cli = main(["fit", "--trainer.max_epochs=3", *args])
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    best = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (best["epoch"], best["global_step"]) == (0, 3)
    assert (last["epoch"], last["global_step"]) == (2, 9)
    assert not torch.equal(last["state_dict"]["conv.weight"], best["state_dict"]["conv.weight"])  # two more epochs

    main(["fit", "--trainer.max_epochs=5", "--ckpt_path=last", *args])
    rows = list(csv.DictReader((tmp_path / "lightning_logs" / "version_1" / "metrics.csv").open()))
    trained_epochs = {int(row["epoch"]) for row in rows if row.get("train_loss_step")}
    assert trained_epochs == {3, 4}  # on after epoch 2, nothing trained twice
    assert min(int(row["step"]) for row in rows if row.get("train_loss_step")) in (9, 10)
    resumed_last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (resumed_last["epoch"], resumed_last["global_step"]) == (4, 15)


def test_an_interrupted_fit_keeps_the_last_whole_epoch_and_says_how_to_resume(tmp_path, capsys, no_png_rendering):
    """Ctrl-C in the middle of epoch 1: last.ckpt stays at the end of epoch 0 (the loaders cannot resume
    mid-epoch), the message says so, and `--ckpt_path last` trains epoch 1 again, whole."""
    interrupt = tmp_path / "interrupt.yaml"
    interrupt.write_text("trainer:\n  callbacks:\n    - class_path: fakes.InterruptAtTrainBatch\n"
                         "      init_args: {epoch: 1, batch_index: 1}\n")  # fmt: skip
    args = [f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2", "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false"]  # fmt: skip
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "-c", str(DEFAULT_CONFIG), "-c", str(interrupt), *args])
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl-C after the first
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert exit_info.value.code == 1
    assert f"interrupted: {last} holds the last whole epoch" in capsys.readouterr().err
    checkpoint = torch.load(last, weights_only=True)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 3)
    main(["fit", "--ckpt_path=last", *args])
    rows = list(csv.DictReader((tmp_path / "lightning_logs" / "version_1" / "metrics.csv").open()))
    assert sorted(int(row["step"]) for row in rows if row.get("train_loss_step")) == [3, 4, 5]


def test_dash_c_is_config_for_every_shipped_config(capsys):
    """`-c NAME` and `--config PATH` print the same config: the file's own values, with nothing of
    default.yaml merged underneath. The other spellings of -c become the same `--config PATH`."""

    def printed(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *args, "--print_config"])
        assert exit_info.value.code == 0
        return capsys.readouterr().out

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        by_name = printed("-c", path.stem)
        assert by_name == printed("--config", str(path)), path.name
        config, shown = yaml.safe_load(path.read_text()), yaml.safe_load(by_name)
        for key, value in config["model"].get("init_args", {}).items():
            if not isinstance(value, dict):
                assert shown["model"]["init_args"][key] == value, f"{path.name}: model.init_args.{key}"
        assert shown["model"]["class_path"] == config["model"]["class_path"]
    fruits = yaml.safe_load(printed("-c", "fruits_cnn"))
    assert fruits["model"]["init_args"]["padding"] == 0  # FruitCNN's own default; default.yaml sets 1
    fruits_path = str(CONFIG_DIR / "fruits_cnn.yaml")
    for spelling in (["-c=fruits_cnn"], ["-cfruits_cnn"], ["--config=fruits_cnn.yaml"], ["-c", fruits_path]):
        assert _with_config_paths(["fit", *spelling, "--trainer.max_epochs=1"]) == [
            "fit", "--config", fruits_path, "--trainer.max_epochs=1"
        ], spelling  # fmt: skip
    grid = str(CONFIG_DIR / "sweeps" / "cifar10_twolayer_grid.yaml")
    assert _with_config_paths(["sweep", "-c", "sweeps/cifar10_twolayer_grid"]) == ["sweep", "--config", grid]


def test_help_names_the_program_and_predict_tells_how_to_classify_a_folder(capsys):
    for subcommand in ("fit", "validate", "test", "predict"):
        with pytest.raises(SystemExit) as exit_info:
            main([subcommand, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: python -m lightning_hw {subcommand} [-c FILE.yaml|NAME] [options]\n")
        assert "__main__" not in text
    assert "  python -m lightning_hw predict -c RUN/config.yaml --ckpt_path RUN/checkpoints/best-....ckpt " \
           "--data.predict_dir DIR\n" in text  # fmt: skip
    assert "Every image file under DIR" in text
    main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m lightning_hw SUBCOMMAND")
