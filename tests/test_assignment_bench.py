"""The assignment benchmark: a pytest-benchmark entry for the C++ CPU solver, and the --quick smoke
run of benchmarks/assignment.py (so the script never rots)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import croc
from croc.ops import assignment as assignment_ops

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import assignment as assignment_bench  # noqa: E402

needs_ext = pytest.mark.skipif(not assignment_ops.EXTENSION_AVAILABLE, reason="croc._C is not built")


@needs_ext
@pytest.mark.parametrize("pool", ["normalised", "raw"])
def test_cpu_solver_benchmark(benchmark, pool):
    """B=4 problems of the Croc shape (432 x 2048), features of 256 dims to keep the set-up short."""
    cost = assignment_bench.make_costs(4, 432, 2048, 256, pool, "cpu", seed=0)
    cols = benchmark.pedantic(
        croc.linear_sum_assignment, args=(cost,), kwargs={"backend": "cpu"}, rounds=3, iterations=1
    )
    assert cols.shape == (4, 432)


def test_quick_run_writes_csv_and_plot(tmp_path):
    cmd = [sys.executable, str(BENCH / "assignment.py"), "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    with open(tmp_path / "assignment_cpu.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert (tmp_path / "assignment_cpu.png").exists()
    providers = {r["provider"] for r in rows}
    assert "scipy-loop" in providers
    assert {r["pool"] for r in rows} == {"normalised", "raw"}
    for row in rows:
        assert row["status"] == "ok", row
        assert float(row["ms"]) > 0 and row["device"] and row["commit"] and row["torch"] and row["cpu"]
        solved, total = row["optimal"].split("/")
        if row["provider"].startswith(("croc", "scipy")):
            assert solved == total, row


@needs_ext
def test_reference_totals_without_scipy_run_equal_scipy_optimum():
    host = assignment_bench.make_costs(3, 30, 70, 16, "raw", "cpu", seed=2).double().numpy()
    from_croc = assignment_bench.reference_totals(host, {})
    scipy_cols = np.stack([linear_sum_assignment(p)[1] for p in host])
    from_scipy = assignment_bench.reference_totals(host, {"scipy-loop": scipy_cols})
    assert np.allclose(from_croc, from_scipy, rtol=0, atol=1e-9)
