"""``croc demo --quick``: the whole demo path (three stages, evaluation, the three output files) in a
few steps, checking the files and the exact metrics.json schema."""

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

STAGE_KEYS = {"steps", "seconds", "loss_first", "loss_last"}
EVAL_KEYS = {"caption_token_accuracy", "blind_caption_token_accuracy", "qa_accuracy"}


@pytest.mark.slow
def test_quick_demo_writes_the_three_files(tmp_path, capsys):
    from croc.cli import main

    out = tmp_path / "demo"
    main(["demo", "--quick", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"stages", "eval"}
    assert list(metrics["stages"]) == ["projector", "croc", "finetune"]
    for stage in metrics["stages"].values():
        assert set(stage) == STAGE_KEYS
        assert stage["steps"] == 2 and stage["seconds"] > 0
        assert math.isfinite(stage["loss_first"]) and math.isfinite(stage["loss_last"])
    assert set(metrics["eval"]) == EVAL_KEYS
    assert all(0.0 <= value <= 1.0 for value in metrics["eval"].values())
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (out / "samples.md").read_text()
    assert samples.count("| describe the image in detail . |") == 2
    assert "| how many shapes are there ? |" in samples
    assert "![synthetic-eval-000000](data/eval/images/000000.png)" in samples
    assert "caption token accuracy" in capsys.readouterr().out


def test_ablation_arms_differ_only_in_the_croc_stage(tmp_path):
    from croc.train.ablation import _arm_stages, _write_report
    from croc.train.demo import DemoRecipe

    recipe = DemoRecipe()
    with_croc, without = _arm_stages(recipe, "with_croc"), _arm_stages(recipe, "without_croc")
    assert [m for m, _ in with_croc] == ["projector", "croc", "finetune"]
    assert [m for m, _ in without] == ["projector", "finetune", "finetune"]
    assert [s for _, s in with_croc] == [s for _, s in without]  # same data, steps, lr, packing
    ev = {"caption_token_accuracy": 0.5, "blind_caption_token_accuracy": 0.25, "qa_accuracy": 0.125}
    results = {arm: {"eval": ev, "seconds": {"croc": 2.0}} for arm in ("with_croc", "without_croc")}
    _write_report(tmp_path / "ablation.md", results, recipe)
    table = (tmp_path / "ablation.md").read_text()
    assert "| with_croc | 0.5000 | 0.2500 | 0.1250 | 2 |" in table
    assert "| without_croc | 0.5000 | 0.2500 | 0.1250 | 2 |" in table
