"""Faults in a two-process sequence-parallel (SP = 2) training run on the CPU (gloo, torchrun).

- Rank 1 SIGKILLed at the start of step 3 of 4 (checkpoint of step 2 written), the two ranks
  started as plain processes (no torchrun agent, which would end rank 0 itself): rank 0 fails
  (gloo sees the peer's connection reset; the process group's timeout, ``ddp_timeout`` =
  COLLECTIVE_TIMEOUT, bounds any wait) and exits within FAIL_FAST seconds of the kill; resuming
  from checkpoint-2 (torchrun) ends with exactly the weights of an uninterrupted 4-step run.
- A corrupt image (found when the sample is loaded) and a missing image (found when the dataset is
  built) in the middle of the data under ``on_error="skip"``: both ranks skip the same records and
  the run completes (every rank of a group loads the same batch, so the replacement sample is the same).
"""

import json
import signal
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("deepspeed")

from sp_worker import launch_without_agent, torchrun, write_data

COLLECTIVE_TIMEOUT = 30  # seconds: the gloo process group's timeout (ddp_timeout) in these runs
FAIL_FAST = 45  # seconds from rank 1's SIGKILL until rank 0 has exited (measured: ~8 s)
LAUNCH_TIMEOUT = 240  # seconds for a whole launch, start-up on 2 busy cores included
STEPS = ("--steps", "4", "--save_steps", "2")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_rank_fails_fast_and_resume_matches_uninterrupted(tmp_path):
    data = write_data(tmp_path / "data")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    torchrun("train", "--data", str(data), "--out", str(straight), *STEPS)
    ranks = launch_without_agent("train", "--data", str(data), "--out", str(killed), *STEPS, "--kill_at", "3",
                                 "--timeout", str(COLLECTIVE_TIMEOUT))  # fmt: skip
    outputs = [rank.communicate(timeout=LAUNCH_TIMEOUT) for rank in ranks]
    exited = time.time()
    assert ranks[1].returncode == -signal.SIGKILL
    assert ranks[0].returncode not in (0, None), outputs[0][1][-3000:]
    assert exited - float((killed / "killed_at").read_text()) < FAIL_FAST, outputs[0][1][-3000:]
    assert not (killed / "weights.pt").exists()
    checkpoint = killed / "checkpoint-2"
    assert checkpoint.is_dir() and not (killed / "checkpoint-4").exists()
    torchrun("train", "--data", str(data), "--out", str(killed), *STEPS, "--resume", str(checkpoint))
    expected, resumed = torch.load(straight / "weights.pt"), torch.load(killed / "weights.pt")
    assert expected.keys() == resumed.keys()
    assert [key for key, value in expected.items() if not torch.equal(resumed[key], value)] == []
    logs = json.loads((killed / "logs.json").read_text())["logs"]
    straight_logs = json.loads((straight / "logs.json").read_text())["logs"]
    assert [entry["loss"] for entry in logs[-2:]] == [entry["loss"] for entry in straight_logs[-2:]]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bad_images_are_skipped_on_every_rank(tmp_path):
    data = write_data(tmp_path / "data", broken=(9, 12))  # 9: corrupt file, 12: missing file
    out = tmp_path / "out"
    torchrun("train", "--data", str(data), "--out", str(out), "--on_error", "skip", "--steps", "6",
             timeout=LAUNCH_TIMEOUT)  # fmt: skip
    skipped = [json.loads((out / f"skipped-{rank}.json").read_text()) for rank in (0, 1)]
    assert skipped[0] == skipped[1]
    reasons = " ".join(reason for _, reason in skipped[0])
    assert "missing" in reasons and "cannot be decoded" in reasons, skipped[0]
    logs = json.loads((out / "logs.json").read_text())["logs"]
    assert len(logs) == 6 and all(entry["loss"] > 0 for entry in logs)
