"""Worker of the multi-process tests (tests/test_sequence_parallel.py, tests/test_faults.py).

Run under ``torchrun --nproc_per_node 2`` (gloo, DeepSpeed CPU accelerator) or, for the unsplit
reference, imported and called in one process. Modes:

- ``step``: one hand-made batch (odd length: padded; an image span across the chunk border),
  a sequence-parallel forward/backward against the unsplit forward/backward of the same model on
  every rank; writes the largest loss and gradient differences to ``--out/step-<rank>.json``.
- ``train``: ``train_stage`` in stage ``--stage`` on a synthetic LLaVA dataset (packed rows), with
  ``--sp`` ranks per row (given to ``train_stage``, or with ``--via_parallelism_config`` as
  ``TrainingArguments(parallelism_config=ParallelismConfig(sp_size=...))``) and ``--deepspeed``,
  saving the final weights and the loss logs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

IMAGE_SIZE = 16
MAX_LENGTH = 160
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 tests/sp_worker.py ARGS``; with ``check`` a non-zero exit fails the test."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), str(Path(__file__).resolve()), *args,
    ]  # fmt: skip
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=Path.cwd())
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def launch_without_agent(*args: str) -> list[subprocess.Popen]:
    """Start the two ranks of ``sp_worker.py ARGS`` as plain processes (no torchrun agent to end them)."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        command = [sys.executable, str(Path(__file__).resolve()), *args]
        procs.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def tiny_model(tokenizer, seed: int = 0, stage: str = "croc", text_model: str = "llama", **fields):
    from croc.model import CrocLlavaForConditionalGeneration, tiny_config

    torch.manual_seed(seed)
    config = tiny_config(
        text_model,
        text_overrides=dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        prompt_pool_size=24,
        stage=stage,
        **fields,
    )
    return CrocLlavaForConditionalGeneration(config)


def write_data(root: Path, count: int = 24, broken: tuple[int, ...] = ()) -> Path:
    """A synthetic caption dataset; records in ``broken`` get a corrupt (even) or missing (odd) image."""
    from croc.data import write_synthetic_dataset

    path = write_synthetic_dataset(root, count, seed=0, kind="caption", image_size=IMAGE_SIZE)
    records = json.loads(path.read_text())
    for n, index in enumerate(broken):
        image = path.parent / "images" / records[index]["image"]
        if n % 2:
            records[index]["image"] = "missing/" + records[index]["image"]
        else:
            image.write_bytes(b"not an image")
    path.write_text(json.dumps(records))
    return path


class _KillAt:
    """Trainer callback: SIGKILL this process when step ``step`` begins (after earlier checkpoints),
    writing the time of the kill to ``stamp`` first."""

    def __init__(self, step: int, stamp: Path) -> None:
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == step:
                    stamp.write_text(repr(time.time()))
                    os.kill(os.getpid(), signal.SIGKILL)

        self.callback = Callback()


def train(opts: argparse.Namespace) -> None:
    from transformers import TrainingArguments

    from croc.data import LlavaCollator, LlavaJsonDataset, build_image_processor, build_synthetic_tokenizer
    from croc.train.run import deepspeed_config_path, num_image_tokens, train_stage

    tokenizer, processor = build_synthetic_tokenizer(), build_image_processor(IMAGE_SIZE)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=opts.timeout))
    model = tiny_model(tokenizer, stage=opts.stage)
    sequence_parallel, parallelism = None, {}
    if opts.sp > 1 and opts.via_parallelism_config:
        from accelerate.parallelism_config import ParallelismConfig

        parallelism = {"parallelism_config": ParallelismConfig(sp_size=opts.sp)}
    elif opts.sp > 1:
        from croc.train.sequence_parallel import setup_sequence_parallel

        sequence_parallel = setup_sequence_parallel(model, opts.sp)
    data = Path(opts.data)
    dataset = LlavaJsonDataset(
        data, data.parent / "images", tokenizer, processor, "plain", model.config.image_token_id,
        num_image_tokens(model.config), MAX_LENGTH, on_error=opts.on_error,
    )  # fmt: skip
    out = Path(opts.out)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=opts.steps, learning_rate=3e-3,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, weight_decay=0.0,
        save_strategy="steps" if opts.save_steps else "no", save_steps=opts.save_steps or 500,
        deepspeed=deepspeed_config_path(opts.deepspeed) if opts.deepspeed else None, ddp_backend="gloo" if distributed else None,
        ddp_timeout=opts.timeout, **parallelism,
    )  # fmt: skip
    collator = LlavaCollator(tokenizer.pad_token_id, packing=True, max_length=MAX_LENGTH)
    callbacks = (
        [_KillAt(opts.kill_at, out / "killed_at").callback]
        if opts.kill_at and int(os.environ.get("RANK", 0)) == 1
        else None
    )
    trainer = train_stage(
        model, opts.stage, dataset, collator, args, callbacks=callbacks,
        resume_from_checkpoint=opts.resume, sequence_parallel=sequence_parallel,
    )  # fmt: skip
    state = {
        k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
    }
    if opts.deepspeed == "zero3":
        trainer.save_model(str(out / "final"))
    elif trainer.is_world_process_zero():
        torch.save(state, out / "weights.pt")
    rank = int(os.environ.get("RANK", 0))
    (out / f"skipped-{rank}.json").write_text(json.dumps(dataset.skipped))
    if trainer.is_world_process_zero():
        logs = [e for e in trainer.state.log_history if "loss" in e]
        (out / "logs.json").write_text(json.dumps({"logs": logs}))


def step(opts: argparse.Namespace) -> None:
    import deepspeed

    from croc.data import build_synthetic_tokenizer
    from croc.train.sequence_parallel import setup_sequence_parallel

    deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = build_synthetic_tokenizer()
    results = {}
    for name, text_model, stage, mask_kind in STEP_CASES:
        model = tiny_model(tokenizer, stage=stage, text_model=text_model, mask_kind=mask_kind)
        batch = _step_batch(model.config, len(tokenizer))
        params = [p for p in model.parameters() if p.requires_grad]
        ref = model(**batch)
        ref_grads = torch.autograd.grad(ref.loss, params)
        out = model(**batch, sequence_parallel=setup_sequence_parallel(model, 2))
        grads = torch.autograd.grad(out.loss, params, allow_unused=True)
        mean = []
        for grad, p in zip(grads, params):
            grad = torch.zeros_like(p) if grad is None else grad.clone()
            torch.distributed.all_reduce(grad)
            mean.append(grad / 2)
        results[name] = {
            "loss": abs(float(out.loss) - float(ref.loss)),
            "lm_loss": abs(float(out.lm_loss) - float(ref.lm_loss)),
            "recon_loss": 0.0
            if ref.recon_loss is None
            else abs(float(out.recon_loss) - float(ref.recon_loss)),
            "pool_cols_equal": ref.pool_cols is None or bool(torch.equal(out.pool_cols, ref.pool_cols)),
            "grad": max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(mean, ref_grads)),
            "ref_loss": float(ref.loss.detach()),
            "has_recon": ref.recon_loss is not None,
        }
    Path(opts.out, f"step-{torch.distributed.get_rank()}.json").write_text(json.dumps(results))


# (name, text model, stage, mask kind); qwen2 has 2 kv heads for 4 query heads (GQA, 1 kv head per rank)
STEP_CASES = [
    ("croc", "llama", "croc", "image"),
    ("croc-prefix", "llama", "croc", "prefix"),
    ("croc-gqa", "qwen2", "croc", "image"),
    ("projector", "llama", "projector", "image"),
    ("finetune", "llama", "finetune", "image"),
]


def _step_batch(config, vocab: int) -> dict[str, torch.Tensor]:
    """Two rows of 75 tokens (padded to 76: chunk border at 38). Row 0: text, image, text, then a
    second document whose image crosses the border (30..46); row 1: an image starting right at the
    border, right padding from 70."""
    from croc.pool import random_replace_mask

    per_image, length = config.image_seq_length, 75
    ids = torch.randint(5, vocab, (2, length), generator=torch.Generator().manual_seed(1))
    ids[0, 4 : 4 + per_image] = config.image_token_id
    ids[0, 30 : 30 + per_image] = config.image_token_id
    ids[1, 38 : 38 + per_image] = config.image_token_id
    segment_ids = torch.zeros_like(ids)
    segment_ids[0, 26:] = 1
    position_ids = torch.cat([torch.arange(26), torch.arange(length - 26)]).repeat(2, 1)
    position_ids[1] = torch.arange(length)
    labels = ids.clone()
    labels[ids == config.image_token_id] = -100
    labels[0, 26] = -100
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 70:] = 0
    labels[1, 70:] = -100
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    replace = random_replace_mask(3, per_image, config.replace_ratio, torch.Generator().manual_seed(3))
    return dict(input_ids=ids, labels=labels, attention_mask=attention_mask, pixel_values=pixels,
                segment_ids=segment_ids, position_ids=position_ids, replace_mask=replace)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("train", "step"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--data")
    parser.add_argument("--stage", default="croc")
    parser.add_argument("--sp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--deepspeed")
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--kill_at", type=int, default=0)
    parser.add_argument("--resume")
    parser.add_argument("--on_error", default="raise")
    parser.add_argument("--timeout", type=int, default=60)
    parser.add_argument("--via_parallelism_config", action="store_true")
    opts = parser.parse_args(argv)
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    {"train": train, "step": step}[opts.mode](opts)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
