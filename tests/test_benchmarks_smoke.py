"""CPU smoke runs of the benchmark scripts (``--quick``), so that they never rot."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, out: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, str(BENCH / script), "--quick", "--out", str(out), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    csvs = sorted(out.glob("*.csv"))
    assert csvs, f"{script} wrote no CSV"
    with open(csvs[0], encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_attention_quick(tmp_path):
    rows = _run("attention.py", tmp_path)
    assert (tmp_path / "attention_cpu.png").exists()
    providers = {r["provider"] for r in rows}
    assert {"croc-reference", "sdpa-dense", "sdpa-hf-mask", "flex-eager"} <= providers
    assert {r["mask"] for r in rows} == {"croc", "causal", "gemma3"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(rows), [r["status"] for r in rows if r["status"] != "ok"]
    for row in ok:
        assert float(row["ms"]) > 0 and int(row["visible_pairs"]) > 0
        assert row["device"] and row["commit"] and row["torch"]


@pytest.mark.parametrize("kind", ["croc", "prefix"])
def test_layouts_are_valid_masks(kind):
    sys.path.insert(0, str(BENCH))
    import layouts

    mask = layouts.build_mask(2, 3000, kind, "cpu")
    dense = mask.to_dense()
    image_query = 100  # inside the first sample's image span (prompts are < 64 tokens)
    assert dense[0, image_query, image_query + 1], "image/prefix tokens see later tokens of their span"
    assert layouts.visible_pairs(mask) == int(dense.sum())


def test_gemma3_layout_is_transformers_sliding_layer_mask():
    """The gemma3 layout's intervals (croc_mixed's reading of transformers' mask function) equal
    transformers' own dense mask: causal text, bidirectional images, a window shorter than the row."""
    sys.path.insert(0, str(BENCH))
    import layouts

    mask = layouts.build_mask(2, 900, "gemma3", "cpu")
    dense = layouts.transformers_dense_mask(2, 900, "cpu")[:, 0]
    assert mask.monotone and torch.equal(mask.to_dense(), dense)
    block_ids = layouts.gemma3_block_ids(2, 900)
    first_image = int((block_ids[0] == 0).nonzero()[0])
    assert dense[0, first_image, first_image + 1], "image tokens see later tokens of their image"
    assert int(dense.sum(-1).max()) < 900, "the sliding window is shorter than the row"


def test_train_step_quick(tmp_path):
    rows = _run("train_step.py", tmp_path)
    assert [r["provider"] for r in rows] == ["reference", "croc"]
    for row in rows:
        assert row["status"] == "ok"
        assert float(row["step_ms"]) > 0 and float(row["attention_share"]) > 0
    reference, ours = rows
    assert reference["tokens"] == ours["tokens"], "both providers train on the same samples"
    assert int(reference["images"]) >= 2
    assert int(ours["batch_rows"]) < int(reference["batch_rows"]), "croc packs the samples"
