"""``croc train`` trains in the dtype its arguments say, never the checkpoint's saved dtype.

From tiny checkpoints declaring float16 and bfloat16 (and ``croc init``'s output), every launch the
CLI allows runs one Croc step (projector, LLM, prompt pool and reconstruction head train) with a
learning rate far below 16-bit resolution: without DeepSpeed (plain, ``--bf16``, ``--fp16``
autocast) and under single-process DeepSpeed ZeRO-2 (fp32, ``--bf16``), and resumed from a
checkpoint. Each asserts the dtype of the trained parameters (the saved tensors) and that the
fp32 weights (DeepSpeed bf16: its fp32 master weights) kept updates smaller than half the 16-bit
spacing, which 16-bit weights cannot represent. DeepSpeed ``--fp16`` is not supported by
DeepSpeed's CPU accelerator ("Type fp16 is not supported on your device"): only its dtype choice
is tested here.
"""

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

from safetensors.torch import load_file
from transformers import TrainingArguments

from croc.cli import main
from croc.data import build_image_processor, build_synthetic_tokenizer, write_synthetic_dataset

IMAGE_SIZE = 16
LR = 1e-6
SOURCES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "init": torch.bfloat16}
CHECKED = (
    "model.multi_modal_projector.linear_1.weight",
    "model.language_model.layers.0.self_attn.q_proj.weight",
    "prompt_pool.tokens",
    "reconstruction_head.output.weight",
)
DEEPSPEED_RUNS = {"zero2": (), "zero2-bf16": ("--bf16",)}


def _write_init_source(root: Path, tokenizer, dtype: str | None = None) -> Path:
    """``croc init`` (``--dtype dtype``, default when None) from a tiny Llama and CLIP tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=1, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    tower = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=8,
    )  # fmt: skip
    CLIPVisionModel(tower).save_pretrained(root / "clip")
    out = root / f"init-{dtype}"
    flags = [] if dtype is None else ["--dtype", dtype]
    main(["init", "--language_model", str(root / "llm"), "--vision_tower", str(root / "clip"),
          "--output_dir", str(out), "--prompt_pool_size", "8", *flags])  # fmt: skip
    return out


def _write_tiny_source(folder: Path, tokenizer, dtype: torch.dtype) -> Path:
    from croc.model import CrocLlavaForConditionalGeneration, tiny_config

    torch.manual_seed(0)
    config = tiny_config(
        text_overrides=dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        prompt_pool_size=24,
    )
    CrocLlavaForConditionalGeneration(config).to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    build_image_processor(IMAGE_SIZE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data, and the source checkpoint folders by name (each declaring its tensors' dtype)."""
    root = tmp_path_factory.mktemp("dtype")
    tokenizer = build_synthetic_tokenizer()
    data = write_synthetic_dataset(root / "data", 8, seed=0, kind="caption", image_size=IMAGE_SIZE)
    sources = {
        name: _write_tiny_source(root / name, tokenizer, SOURCES[name]) for name in ("float16", "bfloat16")
    }
    sources["init"] = _write_init_source(root, tokenizer)
    for name, folder in sources.items():
        assert _declared_dtype(folder) == SOURCES[name] and _saved_dtypes(folder) == {SOURCES[name]}
    return root, data, sources


def _train_argv(world, source: str, out: Path, *flags: str, steps: int = 1) -> list[str]:
    _, data, sources = world
    return [
        "train", "--stage", "croc", "--model_name_or_path", str(sources[source]), "--data_path", str(data),
        "--image_folder", str(data.parent / "images"), "--max_length", "160", "--output_dir", str(out),
        "--use_cpu", "--max_steps", str(steps), "--per_device_train_batch_size", "4",
        "--learning_rate", str(LR), "--weight_decay", "0", "--lr_scheduler_type", "constant",
        "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", "0", *flags,
    ]  # fmt: skip


def _declared_dtype(folder: Path) -> torch.dtype:
    return getattr(torch, json.loads((folder / "config.json").read_text())["dtype"])


def _saved_dtypes(folder: Path) -> set[torch.dtype]:
    """The dtypes of the tensors a checkpoint folder holds (those the model trained with)."""
    return {tensor.dtype for tensor in load_file(folder / "model.safetensors").values()}


def _fp32_weights(folder: Path) -> dict[str, torch.Tensor]:
    from croc.model import CrocLlavaForConditionalGeneration

    model = CrocLlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return {key: value.detach() for key, value in model.state_dict().items()}


def _deepspeed_master_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


def _half_spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the gap between ``dtype`` values around each element of ``x`` (float32, same shape): a
    ``dtype`` weight cannot move by less (a step down from a power of two is exactly this)."""
    info = torch.finfo(dtype)
    mantissa_bits = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    exponent = torch.floor(torch.log2(x.abs().clamp_min(info.tiny)))
    return torch.exp2(exponent - mantissa_bits - 1)


def _assert_small_updates_kept(start: dict, after: dict, resolution: torch.dtype) -> None:
    """Most elements of each CHECKED parameter moved, by about LR, less than half the spacing of
    ``resolution`` (the pool: only the tokens the step assigned)."""
    for key in CHECKED:
        assert after[key].dtype == torch.float32, key
        moved = (after[key] - start[key]).abs()
        below = (moved > 0) & (moved <= 3 * LR) & (moved < _half_spacing(start[key], resolution))
        fraction = below.float().mean().item()
        assert fraction > (0.25 if key == "prompt_pool.tokens" else 0.8), (key, fraction)


@pytest.fixture(scope="module")
def plain_run(world):
    """``plain_run(source, flags)``: the output folder of that run without DeepSpeed (each run once)."""
    done = {}

    def run(source: str, flags: tuple[str, ...]) -> Path:
        if (source, flags) not in done:
            out = world[0] / "plain" / source / ("".join(flags) or "fp32")
            main(_train_argv(world, source, out, *flags))
            done[source, flags] = out
        return done[source, flags]

    return run


PLAIN_RUNS = [(source, flags) for source in SOURCES for flags in ((), ("--bf16",))] + [
    ("float16", ("--fp16",))
]


@pytest.mark.slow
@pytest.mark.parametrize(("source", "flags"), PLAIN_RUNS, ids=lambda x: "".join(x).lstrip("-") or "fp32")
def test_without_deepspeed_weights_train_in_fp32(world, plain_run, source, flags):
    out = plain_run(source, flags)
    assert _saved_dtypes(out) == {torch.float32}
    _assert_small_updates_kept(_fp32_weights(world[2][source]), _fp32_weights(out), SOURCES[source])


@pytest.mark.slow
@pytest.mark.parametrize("source", list(SOURCES))
def test_resumed_run_trains_in_fp32(world, plain_run, tmp_path, source):
    """A ``--bf16`` run resumed (``--resume_from_checkpoint``) from its fp32 checkpoint of step 1
    continues in fp32, though ``--model_name_or_path`` is 16-bit."""
    checkpoint = plain_run(source, ("--bf16",)) / "checkpoint-1"
    out = tmp_path / "resumed"
    main(_train_argv(world, source, out, "--bf16", "--resume_from_checkpoint", str(checkpoint), steps=2))
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-1").exists()
    assert _saved_dtypes(out) == {torch.float32}
    _assert_small_updates_kept(_fp32_weights(checkpoint), _fp32_weights(out), SOURCES[source])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deepspeed_runs(world):
    """Every (source, DEEPSPEED_RUNS) ``croc train`` run, then a ZeRO-2 bf16 run resumed from the
    bf16 source's step 1: one single-process DeepSpeed job on the CPU (one process start)."""
    pytest.importorskip("deepspeed")
    root = world[0] / "deepspeed"
    runs = [
        _train_argv(
            world, source, root / source / name, "--deepspeed", "zero2", "--ddp_backend", "gloo", *flags
        )
        for source in SOURCES
        for name, flags in DEEPSPEED_RUNS.items()
    ]
    checkpoint = root / "bfloat16" / "zero2-bf16" / "checkpoint-1"
    resume = (
        "--deepspeed",
        "zero2",
        "--ddp_backend",
        "gloo",
        "--bf16",
        "--resume_from_checkpoint",
        str(checkpoint),
    )
    runs.append(_train_argv(world, "bfloat16", root / "resumed", *resume, steps=2))
    env = {
        **os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }  # fmt: skip
    script = (
        "import json, sys\nfrom croc.cli import main\nfor argv in json.loads(sys.argv[1]):\n    main(argv)"
    )
    command = [sys.executable, "-c", script, json.dumps(runs)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=Path.cwd())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("run", list(DEEPSPEED_RUNS))
@pytest.mark.parametrize("source", list(SOURCES))
def test_deepspeed_zero2(world, deepspeed_runs, source, run):
    """ZeRO-2 without ``--bf16`` trains fp32 weights; with it, bf16 weights over DeepSpeed's fp32
    master weights (started from the bf16-rounded source), which keep the small update."""
    out = deepspeed_runs / source / run
    if run == "zero2":
        assert _saved_dtypes(out) == {torch.float32}
        _assert_small_updates_kept(_fp32_weights(world[2][source]), _fp32_weights(out), SOURCES[source])
        return
    assert _saved_dtypes(out) == {torch.bfloat16}
    start = {key: value.to(torch.bfloat16).float() for key, value in _fp32_weights(world[2][source]).items()}
    _assert_small_updates_kept(start, _deepspeed_master_weights(out / "checkpoint-1"), torch.bfloat16)


@pytest.mark.slow
def test_deepspeed_bf16_resumed_run_keeps_fp32_master_weights(deepspeed_runs):
    first = _deepspeed_master_weights(deepspeed_runs / "bfloat16" / "zero2-bf16" / "checkpoint-1")
    out = deepspeed_runs / "resumed"
    assert _saved_dtypes(out) == {torch.bfloat16}
    _assert_small_updates_kept(first, _deepspeed_master_weights(out / "checkpoint-2"), torch.bfloat16)


@pytest.mark.parametrize(
    ("bf16", "fp16", "deepspeed", "expected"),
    [
        (False, False, False, torch.float32),
        (True, False, False, torch.float32),
        (False, True, False, torch.float32),
        (False, False, True, torch.float32),
        (True, False, True, torch.bfloat16),
        (False, True, True, torch.float16),
    ],
)
def test_parameter_dtype_comes_from_the_training_arguments(tmp_path, bf16, fp16, deepspeed, expected):
    from croc.train.run import _parameter_dtype

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=bf16, fp16=fp16)
    args.deepspeed = "zero2" if deepspeed else None  # set after parsing: reading the config needs a launch
    assert _parameter_dtype(args) == expected


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_init_declares_the_dtype_of_the_tensors_it_saves(tmp_path, dtype):
    out = _write_init_source(tmp_path, build_synthetic_tokenizer(), dtype)
    config = json.loads((out / "config.json").read_text())
    assert {config["dtype"], config["text_config"]["dtype"], config["vision_config"]["dtype"]} == {dtype}
    assert _saved_dtypes(out) == {getattr(torch, dtype)}
