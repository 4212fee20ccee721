"""Sequence parallelism (DeepSpeed Ulysses) of a tiny Croc LLaVA on the CPU.

Fast, in-process: padding to a multiple of N, the whole-row label shift, the head-count rules.
Two processes (``torchrun --nproc_per_node 2``, gloo, DeepSpeed CPU accelerator; marked
``multiprocess``): one sequence-parallel step against the unsplit step of the same model (an image
span across the chunk border, a padded odd length, packed documents), and 3 training steps of
stage "croc" with SP = 2 against SP = 1 with the same global batch (plain and ZeRO-3).

fp32 tolerance: losses of one step to 1e-5 absolute (measured <= 5e-7); gradients of one step to
1e-5 of each tensor's largest entry (measured <= 8e-7); after 3 AdamW steps (lr 3e-3) the logged
losses to 1e-4 (4 logged digits), the gradient norm to 1e-3 relative and every weight to 5e-5
absolute (measured 3.5e-6 plain, 6.4e-6 ZeRO-3: Adam's normalisation turns the ~1e-7 relative
gradient differences of summation order into ~1e-6 weight differences).
"""

import csv
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from sp_worker import tiny_model, torchrun, write_data

from croc.data.templates import IGNORE_INDEX
from croc.integrations.sequence_parallel import check_heads
from croc.train.sequence_parallel import pad_to_multiple, shifted_targets


@pytest.mark.parametrize("length", [7, 8])
def test_pad_to_multiple_masks_the_padding(length):
    ids = torch.arange(2 * length).view(2, length) + 5
    batch = pad_to_multiple(
        {"input_ids": ids, "labels": ids.clone(), "segment_ids": torch.zeros_like(ids)}, 4, 0
    )
    padded = -(-length // 4) * 4
    assert batch["input_ids"].shape == (2, padded)
    extra = padded - length
    assert torch.equal(batch["input_ids"][:, :length], ids)
    assert (batch["attention_mask"][:, length:] == 0).all() and (
        batch["attention_mask"][:, :length] == 1
    ).all()
    assert (batch["labels"][:, length:] == IGNORE_INDEX).all()
    assert (batch["segment_ids"][:, length:] == 1).all()
    assert torch.equal(batch["position_ids"][:, :length], torch.arange(length).expand(2, length))
    assert batch["position_ids"].shape == (2, padded) and (batch["position_ids"][:, length:] == 0).all()
    assert extra == 0 or (batch["input_ids"][:, length:] == 0).all()


def test_shifted_targets_cross_chunk_borders_not_documents():
    labels = torch.tensor([[10, 11, 12, 13, 14, 15]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 1]])
    targets = shifted_targets(labels, segments)
    # position 2 (end of document 0) does not predict 13; the last position predicts nothing;
    # with chunks of 3 on 2 ranks, position 2 would be the last of chunk 0 if the document went on
    assert targets.tolist() == [[11, 12, IGNORE_INDEX, 14, 15, IGNORE_INDEX]]
    assert shifted_targets(labels, None).tolist() == [[11, 12, 13, 14, 15, IGNORE_INDEX]]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "size", "ok"),
    [
        (4, 4, 2, True),
        (4, 2, 4, True),
        (4, 2, 2, True),
        (8, 4, 8, True),
        (4, 4, 3, False),
        (8, 4, 3, False),
        (12, 6, 4, False),
    ],
)
def test_check_heads(heads, kv_heads, size, ok):
    from types import SimpleNamespace

    config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads)
    if ok:
        check_heads(config, size)
    else:
        with pytest.raises(ValueError, match="sequence_parallel_size"):
            check_heads(config, size)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_one_step_equals_the_unsplit_step(tmp_path):
    pytest.importorskip("deepspeed")
    torchrun("step", "--out", str(tmp_path))
    for rank in (0, 1):
        results = json.loads((tmp_path / f"step-{rank}.json").read_text())
        assert set(results) == {"croc", "croc-prefix", "croc-gqa", "projector", "finetune"}
        for name, diffs in results.items():
            assert diffs["ref_loss"] > 0 and diffs["has_recon"] == name.startswith("croc"), (name, diffs)
            assert diffs["loss"] < 1e-5 and diffs["lm_loss"] < 1e-5 and diffs["recon_loss"] < 1e-5, (
                name,
                diffs,
            )
            assert diffs["pool_cols_equal"], (name, diffs)
            assert diffs["grad"] < 1e-5, (name, diffs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("sp_data"))


@pytest.fixture(scope="module")
def unsplit(data, tmp_path_factory):
    """SP = 1 in this process: the reference weights and logs after 3 steps."""
    import sp_worker

    out = tmp_path_factory.mktemp("sp1")
    sp_worker.main(["train", "--data", str(data), "--out", str(out), "--sp", "1"])
    return torch.load(out / "weights.pt"), json.loads((out / "logs.json").read_text())["logs"]


def assert_same_training(weights, logs, reference):
    ref_weights, ref_logs = reference
    assert len(logs) == len(ref_logs) == 3
    for mine, ref in zip(logs, ref_logs):
        for key in ("loss", "lm_loss", "recon_loss"):
            assert mine[key] == pytest.approx(ref[key], abs=1e-4), (key, mine, ref)  # logs keep 4 digits
        # the gradient norm (before clipping) catches a wrong gradient scale, which Adam's update hides
        assert float(mine["grad_norm"]) == pytest.approx(float(ref["grad_norm"]), rel=1e-3), (mine, ref)
    assert weights.keys() == ref_weights.keys()
    for key, value in ref_weights.items():
        torch.testing.assert_close(weights[key], value, atol=5e-5, rtol=0, msg=key)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sp2_trains_like_sp1(data, unsplit, tmp_path):
    pytest.importorskip("deepspeed")
    torchrun("train", "--data", str(data), "--out", str(tmp_path), "--via_parallelism_config")
    logs = json.loads((tmp_path / "logs.json").read_text())["logs"]
    assert_same_training(torch.load(tmp_path / "weights.pt"), logs, unsplit)
    start = unsplit[0]["prompt_pool.tokens"]
    from croc.data import build_synthetic_tokenizer

    initial = tiny_model(build_synthetic_tokenizer()).state_dict()
    assert not torch.allclose(initial["prompt_pool.tokens"], start)  # the comparison is after real updates


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_with_sp2_trains_like_sp1(data, unsplit, tmp_path):
    pytest.importorskip("deepspeed")
    from croc.model import CrocLlavaForConditionalGeneration

    torchrun("train", "--data", str(data), "--out", str(tmp_path), "--deepspeed", "zero3")
    logs = json.loads((tmp_path / "logs.json").read_text())["logs"]
    trained = CrocLlavaForConditionalGeneration.from_pretrained(tmp_path / "final", dtype=torch.float32)
    assert_same_training(trained.state_dict(), logs, unsplit)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_croc_train_cli_with_sequence_parallel_size(data, tmp_path):
    pytest.importorskip("deepspeed")
    import subprocess
    import sys

    from sp_worker import ENV, IMAGE_SIZE, MAX_LENGTH, free_port

    from croc.data import build_image_processor, build_synthetic_tokenizer
    from croc.model import CrocLlavaForConditionalGeneration

    tokenizer = build_synthetic_tokenizer()
    model = tiny_model(tokenizer, stage="projector")
    init, out = tmp_path / "init", tmp_path / "out"
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    build_image_processor(IMAGE_SIZE).save_pretrained(init)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "croc.cli", "train", "--stage", "projector", "--sequence_parallel_size", "2",
        "--model_name_or_path", str(init), "--data_path", str(data), "--image_folder", str(data.parent / "images"),
        "--max_length", str(MAX_LENGTH), "--output_dir", str(out), "--use_cpu", "--ddp_backend", "gloo",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert sum("'lm_loss'" in line for line in (result.stdout + result.stderr).splitlines()) == 2
    trained = CrocLlavaForConditionalGeneration.from_pretrained(out)
    assert trained.config.text_config._attn_implementation != "croc_mixed_ulysses"
    before, after = model.state_dict(), trained.state_dict()
    changed = {key for key, value in after.items() if not torch.equal(value, before[key])}
    assert changed and all(key.startswith("model.multi_modal_projector.") for key in changed), changed


@pytest.mark.slow
@pytest.mark.multiprocess
def test_train_step_benchmark_sequence_parallel_quick(tmp_path):
    pytest.importorskip("deepspeed")
    import subprocess
    import sys

    from sp_worker import ENV

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
    command = [sys.executable, str(script), "--out", str(tmp_path), "--quick", "--sequence_parallel", "2"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    (row,) = list(csv.DictReader((tmp_path / "train_step_sp_cpu.csv").open()))
    assert row["provider"] == "croc-sp2" and row["status"] == "ok" and row["world_size"] == "2"
    assert float(row["step_ms"]) > 0 and int(row["tokens"]) > 0


@pytest.mark.parametrize(("size", "match"), [(1, "int >= 2"), (True, "int >= 2"), (2, "torch.distributed")])
def test_setup_rejects_bad_sizes_and_a_missing_process_group(size, match):
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    from croc.data import build_synthetic_tokenizer
    from croc.train.sequence_parallel import setup_sequence_parallel

    if dist.is_initialized():
        pytest.skip("needs a process without torch.distributed")
    with pytest.raises(ValueError, match=match):
        setup_sequence_parallel(tiny_model(build_synthetic_tokenizer()), size)


def test_parallelism_config_without_sp_keeps_the_unsplit_path(tmp_path):
    from types import SimpleNamespace

    from croc.train.sequence_parallel import from_parallelism_config

    assert from_parallelism_config(None, SimpleNamespace(parallelism_config=None)) is None
    assert (
        from_parallelism_config(None, SimpleNamespace(parallelism_config=SimpleNamespace(sp_size=1))) is None
    )
    with pytest.raises(ValueError, match="model"):
        from_parallelism_config(None, SimpleNamespace(parallelism_config=SimpleNamespace(sp_size=2)))
