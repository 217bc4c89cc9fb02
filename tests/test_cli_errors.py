"""A user's mistakes on the command line, each run through `main([...])`: one line
`error: <what> (<file or value>): <what to do>` on stderr, exit status 2 (usage) or 1
(data, checkpoint), no traceback unless asked for, and no run folder left behind;
validate/test/predict refuse to run without a checkpoint; a checkpoint of another model
or data set names the run's own config.yaml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fakes import write_cifar10
from lightning_hw import sweep
from lightning_hw.callbacks import plots
from lightning_hw.cli import OTHER_SUBCOMMANDS, SUBCOMMAND_SUMMARIES, TRAINER_SUBCOMMANDS, main
from lightning_hw.data import DataNotFoundError
from lightning_hw.errors import DEBUG_ENV, CommandError

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
         "--trainer.limit_test_batches=1", "--trainer.num_sanity_val_steps=0", *QUIET]  # fmt: skip


def error_of(args: list[str], capsys) -> tuple[int, str]:
    """(exit status, the error line) of `main(args)`, which must fail with one `error: ` line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    return exit_info.value.code, errors[0]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[Path, Path]:
    """A short default fit: (its run folder, its best checkpoint)."""
    root = tmp_path_factory.mktemp("digits_run")
    patch = pytest.MonkeyPatch()
    patch.setattr(plots, "_save", lambda figure, path: figure.clear())  # PNGs are tested elsewhere
    cli = main(["fit", f"--trainer.default_root_dir={root}", *SHORT])
    patch.undo()
    return Path(cli.trainer.log_dir), Path(cli.trainer.checkpoint_callback.best_model_path)


# -- usage mistakes: exit status 2 ------------------------------------------------------------------


def test_a_misspelt_subcommand_lists_every_subcommand(capsys):
    status, line = error_of(["fti", "--trainer.max_epochs=1"], capsys)
    assert status == 2 and line.startswith("error: unknown subcommand (fti): did you mean fit?")
    listed = line.split("choose one of ")[1].split(" (")[0].split(", ")
    assert listed == [*TRAINER_SUBCOMMANDS, *OTHER_SUBCOMMANDS]
    assert set(listed) == set(SUBCOMMAND_SUMMARIES) >= {"fit", "validate", "test", "predict", "sweep", "ensemble"}


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("trainer:\n  max_epochs: 2\nmodel:\n  init_args:\n    hidden_sizes: [64, 32\n")
    status, line = error_of(["fit", "-c", str(config)], capsys)
    assert status == 2 and line.startswith(f"error: YAML syntax error ({config}, line 6, column 1): ")
    assert "from line 5, column 19" in line and "correct the file" in line
    config.write_text("trainer:\n\tmax_epochs: 2\n")  # a tab
    status, line = error_of(["test", "--config", str(config)], capsys)
    assert status == 2 and f"({config}, line 2, column 1)" in line
    config.write_text("- fit\n- 3\n")
    status, line = error_of(["fit", "-c", str(config)], capsys)
    assert status == 2 and "not a mapping of options" in line and str(config) in line


@pytest.mark.parametrize(
    "option, kind, valid",
    [
        ("--model=NoSuchNet", "model", ["EmotionCNN", "FruitCNN", "TransferNet", "TwoLayerNet"]),
        ("--model=lightning_hw.models.NoSuchNet", "model", ["FruitCNN", "TwoLayerNet"]),
        ("--data=Cifar10", "data", ["CIFAR10DataModule", "DigitsDataModule", "FER2013DataModule", "FruitsDataModule"]),
    ],
)
def test_an_unknown_class_lists_the_valid_ones(option, kind, valid, capsys):
    status, line = error_of(["fit", option], capsys)
    given = option.split("=", 1)[1]
    assert status == 2 and line.startswith(f"error: unknown {kind} class ({given}): choose one of ")
    assert all(name in line for name in valid)


def test_an_unknown_class_in_a_config_lists_the_valid_ones(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("model:\n  class_path: lightning_hw.models.FruitCnn\n")
    status, line = error_of(["fit", "-c", str(config)], capsys)
    assert status == 2 and "unknown model class (lightning_hw.models.FruitCnn)" in line and "FruitCNN" in line


@pytest.mark.parametrize(
    "args, expected",
    [
        (["fit", "--no_such_option=1"], "error: unknown option (--no_such_option=1): "),
        (["fit", "--trainer.max_epochs=many"], "error: invalid value for --trainer.max_epochs (many): expected int"),
        (["fit", "--model.init_args.hidden_sizes=wide"],
         "error: invalid value for --model.init_args.hidden_sizes (wide): expected Sequence"),
        (["fit", "-c", "no_such_config"], "error: config not found (no_such_config): give a YAML file or a shipped"),
        (["fit", "--model.init_args.label_smoothing=1.5"], "error: invalid configuration: label_smoothing must lie in"),
    ],
)
def test_other_usage_mistakes_are_one_line(args, expected, capsys):
    status, line = error_of(args, capsys)
    assert status == 2 and line.startswith(expected)


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_without_a_checkpoint_refuses(subcommand, tmp_path, capsys):
    status, line = error_of([subcommand, f"--trainer.default_root_dir={tmp_path / 'runs'}"], capsys)
    assert status == 2
    assert line.startswith(f"error: {subcommand} needs a trained model (no --ckpt_path): pass --ckpt_path ")
    assert not (tmp_path / "runs").exists()


# -- data and checkpoint failures: exit status 1, no run folder ------------------------------------


@pytest.mark.parametrize("subcommand", ["predict", "test", "fit"])
def test_a_missing_checkpoint_leaves_nothing_behind(subcommand, tmp_path, capsys):
    missing = tmp_path / "gone.ckpt"
    status, line = error_of([subcommand, f"--ckpt_path={missing}", f"--trainer.default_root_dir={tmp_path / 'runs'}"],
                            capsys)  # fmt: skip
    assert status == 1 and line.startswith(f"error: checkpoint not found ({missing}): give the .ckpt file of a fit")
    assert not (tmp_path / "runs").exists()


def test_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    for name, content in (("notes.ckpt", b"some text"), ("empty.ckpt", b"")):
        (tmp_path / name).write_bytes(content)
        status, line = error_of(["predict", f"--ckpt_path={tmp_path / name}"], capsys)
        assert status == 1 and line.startswith("error: cannot read the checkpoint") and name in line


@pytest.mark.parametrize(
    "config, data_dir, expected",
    [
        ("cifar10_twolayer", "cifar", "CIFAR-10 not found in {data_dir}"),
        ("fer2013_cnn_small", "fer", "FER2013 not found"),
        ("fruits_cnn", "fruits", "no fruit images: neither {data_dir}"),
    ],
)
def test_missing_data_is_one_line_and_leaves_no_run_folder(config, data_dir, expected, tmp_path, capsys):
    data_dir = tmp_path / data_dir
    data_dir.mkdir()  # empty
    runs = tmp_path / "runs"
    args = ["fit", "-c", config, f"--data.data_dir={data_dir}", f"--trainer.default_root_dir={runs}", *QUIET]
    if config.startswith("cifar10"):
        args.append("--data.download=false")  # nothing downloads in tests
    status, line = error_of(args, capsys)
    assert status == 1 and line.startswith("error: " + expected.format(data_dir=data_dir))
    assert not runs.exists()


def test_data_errors_after_set_up_leave_no_run_folder(digits_run, tmp_path, capsys):
    """The logger's version folder (with config.yaml) exists by the time the images are read: it goes again."""
    run_dir, checkpoint = digits_run
    (tmp_path / "photos").mkdir()
    args = ["predict", "-c", str(run_dir / "config.yaml"), f"--ckpt_path={checkpoint}",
            f"--trainer.default_root_dir={tmp_path / 'runs'}", *QUIET]  # fmt: skip
    status, line = error_of([*args, f"--data.predict_dir={tmp_path / 'photos'}"], capsys)
    assert status == 1 and line.startswith(f"error: predict_dir holds no image files ({tmp_path / 'photos'}): put ")
    status, line = error_of([*args, f"--data.predict_dir={tmp_path / 'nowhere'}"], capsys)
    assert status == 1 and line.startswith(f"error: predict_dir is not a folder ({tmp_path / 'nowhere'})")
    assert not (tmp_path / "runs").exists()


def test_a_checkpoint_of_another_model_names_it_and_the_runs_config(digits_run, tmp_path, capsys):
    run_dir, checkpoint = digits_run
    runs = f"--trainer.default_root_dir={tmp_path / 'runs'}"
    cifar = write_cifar10(tmp_path / "cifar").parent
    args = ["predict", "-c", "cifar10_twolayer", f"--data.data_dir={cifar}", f"--ckpt_path={checkpoint}", runs]
    status, line = error_of(args, capsys)
    assert status == 1
    assert line.startswith("error: the checkpoint holds a FruitCNN model (lightning_hw.models.FruitCNN), not the "
                           f"config's TwoLayerNet ({checkpoint}): ")  # fmt: skip
    assert line.endswith(f"-c {run_dir / 'config.yaml'}")
    # The same model class, trained on other data: refused before the weights load.
    status, line = error_of(["test", "-c", "fer2013_cnn_small", "--model=FruitCNN", f"--ckpt_path={checkpoint}", runs],
                            capsys)  # fmt: skip
    assert status == 1 and "trained on 10 classes of shape (1, 8, 8)" in line and "7 of shape (1, 48, 48)" in line
    assert line.endswith(f"-c {run_dir / 'config.yaml'}")
    assert not (tmp_path / "runs").exists()


# -- the switch for tracebacks, and a real process ---------------------------------------------------


def test_debug_shows_the_exception(tmp_path, monkeypatch):
    missing = ["predict", f"--ckpt_path={tmp_path / 'gone.ckpt'}"]
    with pytest.raises(CommandError, match="checkpoint not found"):
        main([*missing, "--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(CommandError, match="checkpoint not found"):
        main(missing)
    with pytest.raises(DataNotFoundError, match="FER2013 not found"):
        main(["fit", "-c", "fer2013_cnn_small", f"--data.data_dir={tmp_path}", *QUIET])


def test_the_process_prints_one_line_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_hw", "predict", f"--ckpt_path={tmp_path / 'gone.ckpt'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"error: checkpoint not found ({tmp_path / 'gone.ckpt'}): give the .ckpt "
                                          "file of a fit (its run folder's checkpoints/best-*.ckpt)"]  # fmt: skip
    assert list(tmp_path.iterdir()) == []


# -- sweep -----------------------------------------------------------------------------------------


def test_a_sweep_on_missing_data_says_so_once_and_leaves_nothing(tmp_path, capsys):
    settings = tmp_path / "sweep.yaml"
    settings.write_text(
        f"base_config: cifar10_twolayer\noutput_dir: {tmp_path / 'out'}\n"
        "search_space: {model.init_args.hidden_size: [4, 8]}\n"
        f"fit_args: {{data.init_args.data_dir: {tmp_path / 'none'}, data.init_args.download: false}}\n"
    )
    status, line = error_of(["sweep", "-c", str(settings)], capsys)
    assert status == 1 and line.startswith(f"error: CIFAR-10 not found in {tmp_path / 'none'}")
    assert not (tmp_path / "out").exists()
    status, line = error_of(["sweep", "-c", str(settings), "--n_trials=5"], capsys)
    assert status == 2 and line == f"error: invalid sweep settings ({settings}): n_trials=5 exceeds the grid's 2 points"
    assert sweep.build_parser().parse_args(["-c", str(settings)]) == sweep.build_parser().parse_args(
        ["--config", str(settings)]
    )


def test_a_checkpoint_naming_another_class_is_refused_without_importing_it(digits_run, tmp_path, capsys):
    _, checkpoint = digits_run
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"]["_class_path"] = "not_imported_module.Model"
    forged = tmp_path / "forged.ckpt"
    torch.save(content, forged)
    status, line = error_of(["predict", f"--ckpt_path={forged}", f"--trainer.default_root_dir={tmp_path / 'runs'}"],
                            capsys)  # fmt: skip
    assert status == 1 and "holds a Model model (not_imported_module.Model), not the config's FruitCNN" in line
    assert "not_imported_module" not in sys.modules
