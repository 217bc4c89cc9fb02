"""Hypothesis profiles of the property tests (tests/test_fuzz_ops.py), and the
count of the cases they ran, printed at the end of the session; and a short fit
shared by the tests of predict and export (`cifar_run`).

`ci` (the default) keeps the whole suite fast; `fuzz` runs many more
examples: HYPOTHESIS_PROFILE=fuzz python -m pytest tests/test_fuzz_ops.py.
Both draw fresh examples on every run (no fixed seed, not derandomized);
a failure prints the blob that replays it (@reproduce_failure).
"""

import collections
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

_common = dict(
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=100, **_common)
settings.register_profile("fuzz", max_examples=5_000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The CPU route choices (csrc/cpu/route_choice.h) that the tests time go to a folder of this
# run, not the user's cache; subprocesses inherit it.
os.environ.setdefault("LIGHTNING_HW_CACHE_DIR", tempfile.mkdtemp(prefix="lightning_hw_routes_"))
# Timing does not pick the code under test: the built-in rule decides, and the kernels' tests
# force each route where it applies (tests/routes.py); test_route_choice.py turns timing on for
# its own tests. Nor does a route forced in the caller's shell.
os.environ.setdefault("LIGHTNING_HW_AUTOTUNE", "0")
os.environ.pop("LIGHTNING_HW_ROUTE", None)

_fuzz_cases = collections.Counter()


@pytest.fixture(scope="session")
def cifar_run(tmp_path_factory):
    """A short fit of the CIFAR two-layer config (RGB, mean image subtracted, flattened) on generated data:
    (run folder, best checkpoint, data folder)."""
    from fakes import printed_by, write_cifar10

    root = tmp_path_factory.mktemp("cifar_run")
    data_dir = write_cifar10(root / "data").parent
    output = printed_by(["fit", "--config", "cifar10_twolayer", f"--data.data_dir={data_dir}", "--data.val_size=10",
                         "--data.batch_size=20", "--model.init_args.hidden_size=16", "--model.init_args.init_std=null",
                         "--model.init_args.optimizer.init_args.lr=0.01",  # the config's 0.8 kills every ReLU here
                         "--trainer.max_steps=6", f"--trainer.default_root_dir={root / 'runs'}",
                         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])  # fmt: skip
    summary = dict(part.split(": ", 1) for part in output.strip().splitlines()[-1].split(" | "))
    return Path(summary["logs"]), Path(summary["checkpoint"]), data_dir


@pytest.fixture(scope="session")
def fuzz_cases():
    """(op, kind) -> number of cases run; kind is valid, invalid (torch rejects
    it too) or refused (our contract alone rejects it)."""
    return _fuzz_cases


def pytest_report_header(config):
    """The CPU kernel variant the kernels' tests run in this process, and the others."""
    import torch

    try:
        import lightning_hw.ops  # noqa: F401  (loads the extension)

        variants = [line.split("\t") for line in torch.ops.lightning_hw.cpu_isa_variants()]
        mine = next(line for line in torch.ops.lightning_hw.cpu_kernel_tiles() if line.startswith("isa=")).split("=")[1]
    except Exception as error:  # the tests that need them fail with the same error
        return f"lightning_hw CPU kernels: unavailable ({error})"
    others = ", ".join(name if not missing else f"{name} (this CPU lacks {missing})" for name, missing in variants
                       if name != mine)  # fmt: skip
    return f"lightning_hw CPU kernels: {mine} here; {others} in tests/test_isa_variants.py"


def pytest_terminal_summary(terminalreporter):
    if not _fuzz_cases:
        return
    profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    terminalreporter.section(f"fuzz cases (hypothesis profile {profile})")
    for op in sorted({op for op, _ in _fuzz_cases}):
        kinds = sorted((kind, n) for (name, kind), n in _fuzz_cases.items() if name == op)
        terminalreporter.write_line(f"{op}: " + ", ".join(f"{kind} {n}" for kind, n in kinds))
