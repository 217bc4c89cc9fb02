"""benchmarks/bench_ops.py: the merge of its processes' rows, the table's cells, a failing
process, and a tiny run of the whole script (two processes, the linear cases, short timings)."""

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH_OPS = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ops.py"
_spec = importlib.util.spec_from_file_location("bench_ops", BENCH_OPS)
bench_ops = importlib.util.module_from_spec(_spec)
sys.modules["bench_ops"] = bench_ops  # its dataclasses look their module up there
_spec.loader.exec_module(bench_ops)


def process_row(case, torch_fwd, ours_fwd, torch_fb, ours_fb):
    """A row as one process's measure_cases writes it (times in ms)."""
    return {
        "case": case,
        "batch": 8,
        "flops": 1e9,
        "fwd": {"torch": torch_fwd, "ours": ours_fwd},
        "fwd+bwd": {"torch": torch_fb, "ours": ours_fb},
    }


def test_best_of_processes_keeps_each_fastest_time_and_torchs_spread():
    runs = [
        [process_row("a", 1.0, 2.0, 10.0, 5.0), process_row("b", 3.0, 3.0, 6.0, 9.0)],
        [process_row("a", 2.0, 1.5, 30.0, 6.0), process_row("b", 1.0, 4.0, 3.0, 7.0)],
        [process_row("a", 1.5, 2.5, 20.0, 4.0), process_row("b", 2.0, 3.5, 6.0, 8.0)],
    ]
    a, b = bench_ops.best_of_processes(runs)
    assert (a["case"], a["batch"], a["flops"]) == ("a", 8, 1e9)
    # torch's and ours' fastest may come from different processes.
    assert a["fwd"] == {"torch": 1.0, "ours": 1.5}
    assert a["fwd+bwd"] == {"torch": 10.0, "ours": 4.0}
    assert a["torch_fb_spread"] == 3.0
    assert b["case"] == "b"
    assert b["fwd"] == {"torch": 1.0, "ours": 3.0}
    assert b["fwd+bwd"] == {"torch": 3.0, "ours": 7.0}
    assert b["torch_fb_spread"] == 2.0
    (single,) = bench_ops.best_of_processes([[process_row("a", 1.0, 2.0, 10.0, 5.0)]])
    assert single["fwd+bwd"] == {"torch": 10.0, "ours": 5.0} and single["torch_fb_spread"] == 1.0


def test_mode_cells_give_our_rate_and_its_share_of_the_peak():
    # 2 GFLOP in 10 ms: 200 GFLOP/s, half of a 400 GFLOP/s peak.
    assert bench_ops.mode_cells({"torch": 20.0, "ours": 10.0}, 2e9, 400.0) == ("20.000", "10.000", "2.00", "200 (50%)")
    assert bench_ops.mode_cells({"torch": 20.0, "ours": 10.0}, 2e9, None)[3] == "200"


def test_a_failing_process_raises_with_its_output(tmp_path, monkeypatch):
    failing_python = tmp_path / "python"
    failing_python.write_text('#!/bin/sh\necho "worker args: $*" >&2\nexit 3\n')
    failing_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(failing_python))
    with pytest.raises(RuntimeError, match=r"process 1/2 failed \(exit status 3\)") as failure:
        bench_ops.measure_in_processes(["--only", "linear"], 2)
    assert f"worker args: {BENCH_OPS} --only linear --worker-json " in str(failure.value)


def cpuinfo_value(cpuinfo: str, name: str) -> str:
    return re.search(rf"^{name}\s*:(.*)$", cpuinfo, re.MULTILINE).group(1).strip()


def test_two_processes_report_the_machine_and_one_row_per_linear_case(capsys, monkeypatch):
    monkeypatch.delenv("LIGHTNING_HW_AUTOTUNE", raising=False)  # the benchmark times the routes (the suite does not)
    bench_ops.main(["--processes", "2", "--only", "linear", "--rounds", "1", "--min-run-time", "0.01", "--markdown"])
    out, err = capsys.readouterr()
    lines = out.splitlines()

    assert "torch at its best: fastest of 2 processes" in out
    assert "[process 1/2]" in err and "[process 2/2]" in err
    cpuinfo = Path("/proc/cpuinfo").read_text()
    kernel_flags = [f for f in bench_ops.KERNEL_FLAGS if f in cpuinfo_value(cpuinfo, "flags").split()]
    machine = next(line for line in lines if line.startswith("# machine: "))
    assert cpuinfo_value(cpuinfo, "model name") in machine
    assert "flags: " + (" ".join(kernel_flags) or "none of") in machine
    assert f"; {os.cpu_count()} threads; " in machine  # --threads' default: all cores
    assert f"torch {torch.__version__}" in machine and torch.backends.cpu.get_cpu_capability() in machine
    assert any(line.startswith("# float32 FMA peak: ") for line in lines)
    assert re.search(r"load average \(1 min\): [\d.]+ at start, [\d.]+ at end", out)
    assert re.search(r"^# load average \(1 min\) at end: [\d.]+$", out, re.MULTILINE)
    # The children's route choices, merged: linear_relu chose one per shape.
    routes = [line for line in lines if line.startswith("# route: ")]
    assert any("linear_relu_forward" in line for line in routes) and len(routes) == len(set(routes))

    names = [case.name for case in bench_ops.LINEAR_CASES]
    markdown = [line.strip("| ").split(" | ") for line in lines if line.startswith("| ")]
    assert markdown[0] == list(bench_ops.COLUMNS)
    assert [cells[0] for cells in markdown[1:]] == names
    rate = re.compile(r"\d+( \(\d+%\))?")
    for case, batch, *figures, spread in markdown[1:]:
        assert int(batch) > 0
        torch_fwd, ours_fwd, fwd_x, fwd_rate, torch_fb, ours_fb, fb_x, fb_rate = figures
        assert all(float(ms) > 0 for ms in (torch_fwd, ours_fwd, fwd_x, torch_fb, ours_fb, fb_x))
        assert rate.fullmatch(fwd_rate) and rate.fullmatch(fb_rate)
        assert float(spread) >= 1.0
    # The plain table too: one line per case.
    assert [sum(line.startswith(name + " ") for line in lines) for name in names] == [1] * len(names)
