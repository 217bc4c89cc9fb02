"""lightning_hw.allocation: loading the ops fixes glibc's malloc thresholds (so large
tensors reuse warm memory instead of fresh pages on every call), unless the user
turned it off or set glibc's own malloc settings. Each case runs in a fresh process:
the settings are process-wide and applied once."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="the settings are glibc's"
)

# Minor page faults per call of a step that allocates and frees tensors of 4-48 MB
# in varying order, after a warm-up: each fresh 4 KiB page faults once; warm memory
# does not.
_FAULTS = """
import resource, torch
import lightning_hw.ops as ops
from lightning_hw.allocation import tuning
def step():
    for mb in (4, 48, 8, 16, 40):
        torch.ones(mb << 18).sum()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(tuning())
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def run_fresh(**environment) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LIGHTNING_HW_MALLOC_TUNING")}
    env.update(environment)
    result = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    state, faults = result.stdout.strip().splitlines()[-2:]
    return state, float(faults)


def test_loading_the_ops_keeps_freed_memory_for_reuse():
    state, faults = run_fresh()
    assert state.startswith("on (glibc: every block from the heap")
    assert faults < 50  # 116 MB per call: ~30,000 faults if all came fresh


@pytest.mark.parametrize(
    "environment, expected",
    [
        ({"LIGHTNING_HW_MALLOC_TUNING": "0"}, "off (LIGHTNING_HW_MALLOC_TUNING=0)"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=268435456"}, "off (the user's GLIBC_TUNABLES)"),
        ({"MALLOC_MMAP_THRESHOLD_": "1048576"}, "off (the user's MALLOC_MMAP_THRESHOLD_)"),
        ({"MALLOC_MMAP_MAX_": "0"}, "off (the user's MALLOC_MMAP_MAX_)"),
    ],
)
def test_the_user_can_keep_glibc_as_it_is(environment, expected):
    state, _ = run_fresh(**environment)
    assert state == expected
