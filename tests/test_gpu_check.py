"""benchmarks/gpu_check.py: on a machine without CUDA it says so and exits cleanly (its GPU checks run by hand)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.subprocess
def test_gpu_check_without_cuda_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device visible, on any machine: the CPU-side guard runs
    done = subprocess.run([sys.executable, "gpu_check.py"], cwd=BENCHMARKS, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
