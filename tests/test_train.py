"""Training: the parameters each stage trains, separate lm/recon loss logs, gradient checkpointing,
exact resumption from a checkpoint, and a 2-process DeepSpeed ZeRO-2 run of ``croc train`` on the CPU."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from transformers import TrainerCallback, TrainingArguments

from croc.data import (
    LlavaCollator,
    LlavaJsonDataset,
    build_image_processor,
    build_synthetic_tokenizer,
    write_synthetic_dataset,
)
from croc.train.run import num_image_tokens, train_stage

IMAGE_SIZE = 16
MAX_LENGTH = 160
GROUPS = {
    "vision": "model.vision_tower.",
    "projector": "model.multi_modal_projector.",
    "llm": "model.language_model.",
    "pool": "prompt_pool.",
    "head": "reconstruction_head.",
}
TRAINED = {
    "projector": {"projector"},
    "croc": {"projector", "llm", "pool", "head"},
    "finetune": {"projector", "llm"},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = {
        kind: write_synthetic_dataset(root / kind, 48, seed=i, kind=kind, image_size=IMAGE_SIZE)
        for i, kind in enumerate(("caption", "instruct"))
    }
    return root, data, build_synthetic_tokenizer(), build_image_processor(IMAGE_SIZE)


def _model(tokenizer, seed=0):
    from croc.model import CrocLlavaForConditionalGeneration, tiny_config

    torch.manual_seed(seed)
    config = tiny_config(
        text_overrides=dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        prompt_pool_size=24,
    )
    return CrocLlavaForConditionalGeneration(config)


def _dataset(setup, model, kind):
    _, data, tokenizer, image_processor = setup
    template = "vicuna" if kind == "instruct" else "plain"
    return LlavaJsonDataset(
        data[kind], data[kind].parent / "images", tokenizer, image_processor, template,
        model.config.image_token_id, num_image_tokens(model.config), MAX_LENGTH,
    )  # fmt: skip


def _args(out, steps, **kwargs):
    defaults = dict(
        per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, weight_decay=0.0,
    )  # fmt: skip
    return TrainingArguments(output_dir=str(out), **{**defaults, **kwargs})


def _changed_groups(before: dict, after: dict) -> set[str]:
    """Names of the GROUPS with a parameter that differs between two state dicts."""
    return {
        name
        for name, prefix in GROUPS.items()
        for key, value in after.items()
        if key.startswith(prefix) and not torch.equal(value, before[key])
    }


@pytest.mark.matrix_integration
@pytest.mark.parametrize("stage", ["projector", "croc", "finetune"])
def test_stage_trains_its_parameters_and_logs_both_losses(setup, tmp_path, stage):
    _, _, tokenizer, _ = setup
    model = _model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kind = "instruct" if stage == "finetune" else "caption"
    collator = LlavaCollator(tokenizer.pad_token_id, packing=stage == "croc", max_length=MAX_LENGTH)
    trainer = train_stage(model, stage, _dataset(setup, model, kind), collator, _args(tmp_path, 2))
    assert _changed_groups(before, model.state_dict()) == TRAINED[stage]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["lm_loss"] > 0
        assert ("recon_loss" in entry) == (stage == "croc")
        if stage == "croc":
            expected = entry["lm_loss"] + model.config.recon_loss_weight * entry["recon_loss"]
            assert entry["loss"] == pytest.approx(expected, rel=1e-3)


def test_gradient_checkpointing_gives_the_same_weights(setup, tmp_path):
    _, _, tokenizer, _ = setup
    weights = []
    for checkpointing in (False, True):
        model = _model(tokenizer)
        collator = LlavaCollator(tokenizer.pad_token_id, packing=True, max_length=MAX_LENGTH)
        args = _args(tmp_path / str(checkpointing), 2, gradient_checkpointing=checkpointing)
        train_stage(model, "croc", _dataset(setup, model, "caption"), collator, args)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, atol=1e-5, rtol=1e-4)


class _Killed(RuntimeError):
    pass


class _KillAfterCheckpoint(TrainerCallback):
    """Dies right after the checkpoint of ``step`` is written, as a killed job would."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Killed(f"killed after step {self.step}")


def test_resume_from_checkpoint_continues_exactly(setup, tmp_path):
    _, _, tokenizer, _ = setup
    steps = 4

    def run(out, callbacks=None, resume=None):
        model = _model(tokenizer, seed=1)
        collator = LlavaCollator(tokenizer.pad_token_id, packing=True, max_length=MAX_LENGTH)
        args = _args(out, steps, save_strategy="steps", save_steps=steps // 2, learning_rate=3e-3)
        train_stage(
            model, "croc", _dataset(setup, model, "caption"), collator, args,
            callbacks=callbacks, resume_from_checkpoint=resume,
        )  # fmt: skip
        return model.state_dict()

    straight = run(tmp_path / "straight")
    with pytest.raises(_Killed):
        run(tmp_path / "killed", callbacks=[_KillAfterCheckpoint(steps // 2)])
    checkpoint = tmp_path / "killed" / f"checkpoint-{steps // 2}"
    assert checkpoint.is_dir()
    resumed = run(tmp_path / "killed", resume=str(checkpoint))
    differing = [key for key, value in straight.items() if not torch.equal(resumed[key], value)]
    assert differing == []
    start = _model(tokenizer, seed=1).state_dict()
    assert not torch.equal(start["prompt_pool.tokens"], straight["prompt_pool.tokens"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess  # ~3 min with DeepSpeed's first start: `make test-multiprocess`
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_two_processes_cpu(setup, tmp_path, zero):
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    _, data, tokenizer, image_processor = setup
    init = tmp_path / "init"
    model = _model(tokenizer)
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    image_processor.save_pretrained(init)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "croc.cli", "train", "--stage", "croc", "--model_name_or_path", str(init),
        "--data_path", str(data["caption"]), "--image_folder", str(data["caption"].parent / "images"),
        "--max_length", str(MAX_LENGTH), "--output_dir", str(out), "--deepspeed", zero,
        "--use_cpu", "--ddp_backend", "gloo", "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=Path.cwd())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    log_lines = [
        line for line in result.stdout.splitlines() + result.stderr.splitlines() if "'lm_loss'" in line
    ]
    assert len(log_lines) == 3 and all("'recon_loss'" in line for line in log_lines)
    from croc.model import CrocLlavaForConditionalGeneration

    trained = CrocLlavaForConditionalGeneration.from_pretrained(out).state_dict()
    assert _changed_groups(model.state_dict(), trained) == TRAINED["croc"]
    assert json.loads((out / "config.json").read_text())["stage"] == "croc"


def test_compose_checkpoint_from_a_language_model_and_a_clip_tower(setup, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from croc.cli import main
    from croc.model import CrocLlavaForConditionalGeneration

    _, _, tokenizer, _ = setup
    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    tower = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=8,
        )
    )  # fmt: skip
    tower.save_pretrained(tmp_path / "clip")
    out = tmp_path / "init"
    main(["init", "--language_model", str(tmp_path / "llm"), "--vision_tower", str(tmp_path / "clip"),
          "--output_dir", str(out), "--prompt_pool_size", "8"])  # fmt: skip
    model = CrocLlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    assert model.config.stage == "projector" and model.config.image_seq_length == 4
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    for key, value in llm.state_dict().items():
        mine = (
            model.lm_head.weight
            if key == "lm_head.weight"
            else model.model.language_model.state_dict()[key[6:]]
        )
        torch.testing.assert_close(mine, value.to(torch.bfloat16).float())
    for key, value in tower.state_dict().items():
        torch.testing.assert_close(
            model.model.vision_tower.state_dict()[key], value.to(torch.bfloat16).float()
        )


def test_recipe_flag_sets_config_fields_and_training_defaults(setup, tmp_path):
    """``croc train --recipe croc-release``: its fields land in the saved config, its training
    defaults apply where the command line is silent, and a flag given on the line wins."""
    from croc.cli import main
    from croc.recipes import RECIPES

    _, data, tokenizer, image_processor = setup
    init, out = tmp_path / "init", tmp_path / "out"
    _model(tokenizer).save_pretrained(init)
    tokenizer.save_pretrained(init)
    image_processor.save_pretrained(init)
    main(["train", "--recipe", "croc-release", "--stage", "croc", "--model_name_or_path", str(init),
          "--data_path", str(data["caption"]), "--image_folder", str(data["caption"].parent / "images"),
          "--max_length", str(MAX_LENGTH), "--output_dir", str(out), "--use_cpu", "--max_steps", "1",
          "--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--save_strategy", "no",
          "--report_to", "none", "--disable_tqdm", "true"])  # fmt: skip
    saved = json.loads((out / "config.json").read_text())
    assert {field: saved[field] for field in RECIPES["croc-release"].config} == dict(
        RECIPES["croc-release"].config
    )
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.learning_rate == 3e-3  # given on the command line
    assert (args.lr_scheduler_type, args.warmup_steps, args.weight_decay) == ("cosine", 0.03, 0.0)


def test_victor_trains_the_vision_tower_with_its_own_learning_rate(setup, tmp_path):
    from croc.recipes import recipe_config

    _, _, tokenizer, _ = setup
    model = _model(tokenizer)
    for field, value in recipe_config("victor").items():
        setattr(model.config, field, value)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    collator = LlavaCollator(tokenizer.pad_token_id, packing=True, max_length=MAX_LENGTH)
    trainer = train_stage(model, "croc", _dataset(setup, model, "caption"), collator, _args(tmp_path, 1))
    assert _changed_groups(before, model.state_dict()) == TRAINED["croc"] | {"vision"}
    initial = {group["name"]: group["initial_lr"] for group in trainer.optimizer.param_groups}
    assert initial["vision_tower"] == 2e-6 and initial["pool"] == 1e-3 and initial["llm"] == 1e-2
