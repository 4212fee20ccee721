"""Print the short summary table of a benchmark run directory (the last thing gpu_check.sh shows).

Usage: python benchmarks/summarize.py OUTDIR
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

ATTENTION_COLUMNS = ["mask", "length", "mode", "provider", "ms", "tflops", "peak_mib", "status"]


def _read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _attention(rows: list[dict]) -> None:
    """fwd+bwd rows when the run has them (GPU), else the forward rows (CPU)."""
    mode = "fwd+bwd" if any(r.get("mode") == "fwd+bwd" for r in rows) else "fwd"
    rows = [r for r in rows if r.get("mode") == mode]
    rows.sort(key=lambda r: (r.get("mask", ""), int(r.get("length") or 0), r.get("provider", "")))
    common.print_table(rows, ATTENTION_COLUMNS)


def summarize(out: Path) -> None:
    found = sorted(out.glob("*.csv"))
    if not found:
        print(f"no CSV in {out}")
    for path in found:
        rows = _read(path)
        if not rows:
            continue
        print(
            f"\n--- {path.name}: {rows[0].get('device', '?')}, torch {rows[0].get('torch', '?')}, "
            f"commit {rows[0].get('commit', '?')}, {rows[0].get('date', '?')}"
        )
        if path.name.startswith("attention"):
            _attention(rows)
        else:
            skip = {"device", "torch", "triton", "commit", "date", "cpu", "numpy", "scipy"}
            common.print_table(rows, [c for c in rows[0] if c not in skip])


if __name__ == "__main__":
    summarize(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"))
