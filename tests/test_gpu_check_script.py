"""benchmarks/gpu_check.sh must fit a GPU lease: its step limits are what bounds the run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
LEASE_BUDGET_S = 480  # a 15-minute lease minus the machine's start and a margin
FALLBACK_STEPS = {"build-without-cuda"}  # runs only when the CUDA build failed


def _step_limits() -> dict[str, int]:
    steps = re.findall(r"^\s*(?:\w+=\S+\s+)*step ([\w-]+) (\d+) ", SCRIPT.read_text(), flags=re.M)
    return {name: int(limit) for name, limit in steps}


def test_step_limits_fit_the_lease():
    limits = _step_limits()
    assert {"build", "gpu-tests", "gpu-flex", "bench-attention"} <= limits.keys(), limits
    normal = sum(limit for name, limit in limits.items() if name not in FALLBACK_STEPS)
    assert normal <= LEASE_BUDGET_S, f"gpu_check.sh step limits add up to {normal} s: {limits}"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
