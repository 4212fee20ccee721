"""One Croc stage-1.5 training step: the released code's approach against croc, same samples.

The model is LLaVA with a 7B-shaped text model cut to a few layers (hidden 4096, 32 heads,
D = 128, Llama MLP 11008, vocabulary 32000) and a CLIP ViT-L/14-336-shaped vision tower cut to
a few layers (576 visual tokens per image), bf16 weights, AdamW. The samples are Croc captions:
``[prompt | 576 image tokens | caption]`` with seeded random lengths, enough of them to fill
``--length`` tokens (8192 by default). Both providers see exactly the same samples:

- ``reference`` (what the released Croc code does): no packing, the samples right-padded into a
  batch; attention from a dense [B, 1, L, L] boolean mask through SDPA (croc's reference backend,
  which rebuilds the dense mask in every layer); the Hungarian assignment per image with scipy
  after a device-to-host copy of each cost matrix.
- ``croc``: the samples packed into rows of ``--length`` with ``segment_ids``; the Triton
  mixed-mask kernels (on CUDA); one batched assignment call (``croc.linear_sum_assignment``).

Reported per provider: median step time, tokens/s (real tokens, no padding), peak memory, and
the share of the step spent in attention and in assignment. Those two are measured apart, on
the same shapes: all layers' attention forward+backward, and the pool assignment of the batch;
their share is that time over the step time (an estimate: inside the step they overlap other
work differently).

Sequence-parallel mode (``--sequence_parallel N``, N >= 2): the script relaunches itself under
``torchrun --nproc_per_node N`` (one GPU per process; gloo processes on the CPU) and times croc's
step with every row of ``--length`` tokens split over the N ranks (DeepSpeed Ulysses, DDP over the
ranks for the gradients). Reported: step time, tokens/s of the whole group, and the peak memory of
the busiest GPU, in ``train_step_sp_{gpu,cpu}.csv``.

Usage::

    python benchmarks/train_step.py --out DIR [--device cuda] [--layers 2] [--length 8192]
    python benchmarks/train_step.py --out DIR --quick        # tiny CPU smoke run
    python benchmarks/train_step.py --out DIR --sequence_parallel 4 --length 32768   # 4 GPUs
    python benchmarks/train_step.py --out DIR --quick --sequence_parallel 2          # CPU, 2 processes
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

import croc
from croc.constants import IGNORE_INDEX
from croc.model import CrocLlavaConfig, CrocLlavaForConditionalGeneration


@dataclass
class Shapes:
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_heads: int
    image_size: int
    patch: int
    pool: int

    @property
    def image_token_id(self) -> int:
        return self.vocab - 1

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


SEVEN_B = Shapes(4096, 32, 11008, 32000, 1024, 16, 336, 14, 2048)
TINY = Shapes(64, 2, 128, 512, 32, 2, 16, 4, 64)


def build_model(shapes: Shapes, layers: int, backend: str, device: str, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, LlamaConfig

    text = LlamaConfig(
        hidden_size=shapes.hidden,
        intermediate_size=shapes.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shapes.heads,
        num_key_value_heads=shapes.heads,
        vocab_size=shapes.vocab,
        max_position_embeddings=16384,
        pad_token_id=0,
    )
    vision = CLIPVisionConfig(
        hidden_size=shapes.vision_hidden,
        intermediate_size=4 * shapes.vision_hidden,
        num_hidden_layers=layers,
        num_attention_heads=shapes.vision_heads,
        image_size=shapes.image_size,
        patch_size=shapes.patch,
    )
    config = CrocLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=shapes.image_token_id,
        image_seq_length=shapes.image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        stage="croc",
        prompt_pool_size=shapes.pool,
        attention_backend=backend,
        validate_masks=False,
    )
    with torch.device(device):
        model = CrocLlavaForConditionalGeneration(config)
    return model.to(dtype)


def sample_lengths(total: int, image_tokens: int, seed: int) -> list[tuple[int, int]]:
    """(prompt, caption) lengths of samples whose lengths add up to ``total`` (last one cut)."""
    gen = np.random.default_rng(seed)
    samples, used = [], 0
    while used < total:
        prompt = int(gen.integers(16, 64))
        caption = int(gen.integers(64, 640))
        caption = min(caption, max(1, total - used - prompt - image_tokens))
        samples.append((prompt, caption))
        used += prompt + image_tokens + caption
    return samples


def _sample_tokens(prompt: int, caption: int, shapes: Shapes, gen: torch.Generator):
    image_tokens = shapes.image_tokens
    ids = torch.randint(1, shapes.image_token_id, (prompt + image_tokens + caption,), generator=gen)
    ids[prompt : prompt + image_tokens] = shapes.image_token_id
    labels = ids.clone()
    labels[: prompt + image_tokens] = IGNORE_INDEX
    return ids, labels


def packed_batch(samples, shapes: Shapes, length: int, device: str) -> dict:
    """croc's batch: the samples packed into rows of ``length`` with segment ids."""
    gen = torch.Generator().manual_seed(0)
    rows, row, pos = [], [], 0
    for prompt, caption in samples:
        size = prompt + shapes.image_tokens + caption
        if pos + size > length and row:
            rows.append(row)
            row, pos = [], 0
        row.append(_sample_tokens(prompt, caption, shapes, gen))
        pos += size
    rows.append(row)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attention = torch.zeros_like(ids)
    segments = torch.zeros_like(ids)
    positions = torch.zeros_like(ids)
    for b, samples_in_row in enumerate(rows):
        start = 0
        for doc, (sample_ids, sample_labels) in enumerate(samples_in_row):
            end = start + len(sample_ids)
            ids[b, start:end], labels[b, start:end] = sample_ids, sample_labels
            attention[b, start:end], segments[b, start:end] = 1, doc
            positions[b, start:end] = torch.arange(end - start)
            start = end
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attention}
    batch |= {"segment_ids": segments, "position_ids": positions}
    return {k: v.to(device) for k, v in batch.items()}


def padded_batch(samples, shapes: Shapes, device: str) -> dict:
    """The reference's batch: one sample per row, right padding."""
    gen = torch.Generator().manual_seed(0)
    tokens = [_sample_tokens(p, c, shapes, gen) for p, c in samples]
    longest = max(len(ids) for ids, _ in tokens)
    ids = torch.zeros(len(tokens), longest, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attention = torch.zeros_like(ids)
    for b, (sample_ids, sample_labels) in enumerate(tokens):
        ids[b, : len(sample_ids)], labels[b, : len(sample_ids)] = sample_ids, sample_labels
        attention[b, : len(sample_ids)] = 1
    return {
        k: v.to(device) for k, v in {"input_ids": ids, "labels": labels, "attention_mask": attention}.items()
    }


def per_image_scipy_assign(pool: croc.PromptTokenPool):
    """The released code's assignment: per image, copy the cost to the host and call scipy."""

    def assign(selected: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """selected [B, n, D]; counts int [B] or None -> int64 [B, n], -1 past a row's count."""
        with torch.no_grad():
            cols = torch.full(selected.shape[:2], -1, dtype=torch.int64)
            for row, image in enumerate(selected):
                used = image.shape[0] if counts is None else int(counts[row])
                cost = pool.cost(image[None, :used])[0].cpu().numpy()
                cols[row, :used] = torch.from_numpy(scipy_lsa(cost)[1])
            return cols.to(selected.device)

    return assign


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def attention_time_ms(
    model, batch: dict, shapes: Shapes, layers: int, backend: str, device: str, args
) -> float:
    """All layers' attention forward+backward on the step's shapes, timed alone."""
    ids = batch["input_ids"]
    image_mask = ids == shapes.image_token_id
    mask = croc.MixedMask.from_image_mask(image_mask, batch["attention_mask"], batch.get("segment_ids"))
    head_dim = shapes.hidden // shapes.heads
    dtype = next(model.parameters()).dtype
    q, k, v = (
        torch.randn(
            ids.shape[0], shapes.heads, ids.shape[1], head_dim, device=device, dtype=dtype, requires_grad=True
        )
        for _ in range(3)
    )
    grad = torch.randn_like(q)

    def run():
        out = croc.mixed_attention(q, k, v, mask, scale=1 / math.sqrt(head_dim), backend=backend)
        torch.autograd.grad(out, (q, k, v), grad)

    return layers * common.median_ms(run, device, warmup=args.warmup, reps=args.reps)


def assignment_time_ms(model, num_images: int, shapes: Shapes, device: str, args) -> float:
    count = round(model.config.replace_ratio * shapes.image_tokens)
    dtype = next(model.parameters()).dtype
    selected = torch.randn(num_images, count, shapes.hidden, device=device, dtype=dtype)
    return common.median_ms(lambda: model.prompt_pool.assign(selected), device, warmup=1, reps=args.reps)


def run_provider(name: str, samples, shapes: Shapes, args, dtype) -> dict:
    device = args.device
    backend = "auto" if name == "croc" else "reference"
    torch.manual_seed(0)
    model = build_model(shapes, args.layers, backend, device, dtype)
    if name == "reference":
        model.prompt_pool.assign = per_image_scipy_assign(model.prompt_pool)
        batch = padded_batch(samples, shapes, device)
    else:
        batch = packed_batch(samples, shapes, args.length, device)
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(len(samples), 3, shapes.image_size, shapes.image_size, generator=gen)
    batch["pixel_values"] = pixels.to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        return out

    row = {"provider": name, "layers": args.layers, "length": args.length, "images": len(samples)}
    row |= {"batch_rows": batch["input_ids"].shape[0], "row_length": batch["input_ids"].shape[1]}
    try:
        ms = common.median_ms(step, device, warmup=args.warmup, reps=args.reps)
        peak = common.peak_memory_mib(step, device)
        attention_ms = attention_time_ms(model, batch, shapes, args.layers, backend, device, args)
        assignment_ms = assignment_time_ms(model, len(samples), shapes, device, args)
    except torch.OutOfMemoryError:
        return row | {"status": "oom"}
    tokens = int(batch["attention_mask"].sum())
    row |= {
        "status": "ok",
        "step_ms": round(ms, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / ms * 1e3),
    }
    row |= {"peak_mib": round(peak, 1), "attention_ms": round(attention_ms, 2)}
    row |= {"attention_share": round(attention_ms / ms, 3), "assignment_ms": round(assignment_ms, 2)}
    row |= {"assignment_share": round(assignment_ms / ms, 3)}
    return row


def parse_args(argv=None):
    parser = common.base_parser(__doc__, "tiny model and length (CPU smoke test)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int)
    parser.add_argument("--providers", nargs="+", default=["reference", "croc"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sequence_parallel", type=int, default=1, help="ranks per row (>= 2: SP mode)")
    args = parser.parse_args(argv)
    args.length = args.length or (600 if args.quick else 8192)
    if args.quick:
        args.warmup, args.reps = 1, 2
    return args


def _timed_ms(fn, device: str, warmup: int, reps: int) -> float:
    """Median wall time of ``fn`` with a barrier before each call (every rank runs the same count)."""
    import torch.distributed as dist

    times = []
    for rep in range(warmup + reps):
        sync(device)
        dist.barrier()
        start = time.perf_counter()
        fn()
        sync(device)
        if rep >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def run_sequence_parallel(args, shapes: Shapes, dtype) -> dict:
    """This rank's part of croc's step with rows split over the ``--sequence_parallel`` ranks."""
    import deepspeed
    import torch.distributed as dist

    from croc.train.sequence_parallel import setup_sequence_parallel

    gpu = args.device.startswith("cuda")
    local = int(os.environ["LOCAL_RANK"])
    device = f"cuda:{local}" if gpu else "cpu"
    if gpu:
        torch.cuda.set_device(local)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    torch.manual_seed(0)
    model = build_model(shapes, args.layers, "auto", device, dtype)
    sp = setup_sequence_parallel(model, args.sequence_parallel)
    samples = sample_lengths(args.length, shapes.image_tokens, seed=0)
    batch = packed_batch(samples, shapes, args.length, device)
    pixels = torch.randn(
        len(samples), 3, shapes.image_size, shapes.image_size, generator=torch.Generator().manual_seed(1)
    )
    batch["pixel_values"] = pixels.to(device=device, dtype=dtype)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if gpu else None)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        ddp(**batch, sequence_parallel=sp).loss.backward()
        optimizer.step()

    row = {"provider": f"croc-sp{sp.size}", "sequence_parallel": sp.size, "layers": args.layers}
    row |= {"length": args.length, "images": len(samples), "batch_rows": batch["input_ids"].shape[0]}
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    ms = _timed_ms(step, device, args.warmup, args.reps)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**20 if gpu else float("nan")], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    tokens = int(batch["attention_mask"].sum())
    row |= {
        "status": "ok",
        "step_ms": round(ms, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / ms * 1e3),
    }
    return row | {"peak_mib_per_gpu": round(float(peak), 1), "world_size": dist.get_world_size()}


def main_sequence_parallel(args, argv) -> list[dict]:
    """SP mode: relaunch under torchrun, or (inside it) run and let rank 0 write the CSV."""
    if "WORLD_SIZE" not in os.environ:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(args.sequence_parallel),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if not args.device.startswith("cuda"):
            env |= {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
        argv = sys.argv[1:] if argv is None else list(argv)
        subprocess.run([*command, str(Path(__file__).resolve()), *argv], env=env, check=True)
        path = args.out / f"train_step_sp_{'gpu' if args.device.startswith('cuda') else 'cpu'}.csv"
        with open(path, encoding="utf-8") as f:
            return list(csv.DictReader(f))
    gpu = args.device.startswith("cuda")
    shapes = TINY if args.quick else SEVEN_B
    dtype = torch.bfloat16 if gpu else torch.float32
    row = common.environment(args.device) | {"dtype": str(dtype).removeprefix("torch.")}
    row |= run_sequence_parallel(args, shapes, dtype)
    if int(os.environ["RANK"]) == 0:
        common.write_csv(args.out / f"train_step_sp_{'gpu' if gpu else 'cpu'}.csv", [row])
        common.print_table(
            [row], ["provider", "status", "length", "step_ms", "tokens_per_s", "peak_mib_per_gpu"]
        )
    return [row]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.sequence_parallel > 1:
        return main_sequence_parallel(args, argv)
    shapes = TINY if args.quick else SEVEN_B
    gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        print("train step on the CPU: both providers use the reference attention here (no Triton timing)")
    samples = sample_lengths(args.length, shapes.image_tokens, seed=0)
    env = common.environment(args.device)
    rows = []
    for name in common.progress_bar()(args.providers, desc="train step", unit="provider"):
        rows.append(
            env
            | {"dtype": str(dtype).removeprefix("torch.")}
            | run_provider(name, samples, shapes, args, dtype)
        )
        common.write_csv(args.out / f"train_step_{'gpu' if gpu else 'cpu'}.csv", rows)
    common.print_table(
        rows,
        ["provider", "status", "step_ms", "tokens_per_s", "peak_mib", "attention_share", "assignment_share"],
    )
    return rows


if __name__ == "__main__":
    main()
