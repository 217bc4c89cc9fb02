"""What a fit through the command line must have done, for the tests that run one."""

from __future__ import annotations


def run_summary(output: str) -> dict[str, str]:
    """The parts of the line fit/validate/test print last: {"test accuracy": "97.49%", "logs": ...}."""
    line = next(line for line in output.splitlines() if line.startswith(("test accuracy", "validation accuracy")))
    return dict(part.split(": ", 1) for part in line.split(" | "))


def assert_fast_dev_fit(cli, output: str, model_class: str) -> None:
    """`cli` (what lightning_hw.cli.main returned) ran a fast_dev_run fit: it built the config's
    model, trained it one step and tested it, and the accuracy it printed is the test's."""
    assert type(cli.model).__name__ == model_class
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    accuracy = cli.trainer.callback_metrics["test_acc"].item()
    assert run_summary(output)["test accuracy"] == f"{100 * accuracy:.2f}%"
