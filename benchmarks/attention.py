"""Attention benchmark: croc's mixed-mask kernels against SDPA and FlexAttention, in one run.

Providers (each timed on the same inputs, in the same process, on the same card):

- ``croc``: ``croc.mixed_attention`` (the Triton kernels on CUDA; on the CPU the reference
  backend, labelled ``croc-reference``; the Triton path is not timed on the CPU). Building the
  MixedMask is reported in ``mask_build_ms``; its tile metadata is computed on the first call
  (warm-up) and reused, as in a model where every layer shares one mask;
- ``croc-index``: the same kernels on the same inputs with the index-list schedule instead of the
  range schedule (the mask handed over with ``monotone=False``), for the A/B of ``--schedule``:
  ``range`` (default: ``croc`` only), ``index`` (``croc-index`` only), ``both``;
- ``sdpa-dense``: SDPA with the dense boolean [B, 1, L, L] mask, what users do today; for the
  ``gemma3`` layout the dense mask transformers itself builds (``sdpa_mask``, its build time in
  ``setup_ms``), labelled ``sdpa-hf-mask``: what ``attn_implementation="sdpa"`` runs for Gemma 3.
  The croc mask of that layout comes from the ``"croc_mixed"`` mask builder reading the same
  transformers mask function (its time is ``mask_build_ms``);
- ``sdpa-causal-flash`` / ``sdpa-causal-cudnn``: SDPA with ``is_causal=True`` on one backend, a
  mask-free kernel of about the same density (its FLOPs count its own causal pairs);
- ``flex``: compiled FlexAttention with the same mask as a BlockMask (built once per batch; its
  build time is reported in ``setup_ms``, outside the timing). On the CPU it runs eagerly
  (``flex-eager``, forward only: compiling it on a 2-core machine costs minutes);
- ``croc-flex``: ``croc.mixed_attention(backend="flex")``: FlexAttention with the BlockMask built
  by :meth:`croc.MixedMask.to_block_mask` from the intervals (no ``create_block_mask``); its build
  time is ``setup_ms`` (median of 3), so the two BlockMask builders compare in one run. On the CPU
  it runs eager ``flex_attention`` (``croc-flex-eager``, forward only);
- ``flash-attn``: ``flash_attn_func(causal=True)`` when the package is installed.

FLOPs count visible pairs only: forward 4·D·pairs·Hq, backward 2.5× that. Each row of the CSV
carries the card, torch/triton versions, commit and date. A provider that runs out of memory is
recorded with status ``oom``.

Usage::

    python benchmarks/attention.py --out benchmarks/results            # full GPU grid
    python benchmarks/attention.py --out /tmp/b --quick                # tiny CPU smoke run
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import layouts

import croc

MODES = ("fwd", "bwd", "fwd+bwd")
TOKENS_PER_BATCH = 16384
GPU_PROVIDERS = (
    "croc", "sdpa-dense", "sdpa-causal-flash", "sdpa-causal-cudnn", "flex", "croc-flex", "flash-attn",
)  # fmt: skip
CPU_PROVIDERS = ("croc", "sdpa-dense", "flex", "croc-flex")


class Unavailable(Exception):
    """The provider cannot run in this environment (not an error of the benchmark)."""


def _sdpa_causal(backend_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]

    def run(q, k, v, scale):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    return run


def _flex(mask: croc.MixedMask, q: torch.Tensor, device: str) -> tuple[Callable, float]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    kv_start, kv_end = mask.kv_start, mask.kv_end

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= kv_start[b, q_idx]) & (kv_idx < kv_end[b, q_idx])

    gpu = device.startswith("cuda")
    build = torch.compile(create_block_mask) if gpu else create_block_mask
    build(mask_mod, mask.batch_size, None, mask.num_queries, mask.num_keys, device=device)  # compile
    start = time.perf_counter()
    block_mask = build(mask_mod, mask.batch_size, None, mask.num_queries, mask.num_keys, device=device)
    if gpu:
        torch.cuda.synchronize()
    setup_ms = 1e3 * (time.perf_counter() - start)
    attend = torch.compile(flex_attention, dynamic=False) if gpu else flex_attention

    def run(q, k, v, scale):
        return attend(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)

    return run, setup_ms


def _croc_flex(mask: croc.MixedMask, device: str) -> tuple[Callable, float]:
    """Our BlockMask (from the intervals, timed as setup) with croc's compiled flex backend on CUDA,
    or eager ``flex_attention`` with the same BlockMask on the CPU (forward only)."""
    from torch.nn.attention.flex_attention import flex_attention

    from croc.ops.flex_attention import block_mask_from_intervals

    gpu = device.startswith("cuda")
    build = lambda: block_mask_from_intervals(mask.kv_start, mask.kv_end, mask.num_keys)  # noqa: E731
    setup_ms = common.median_ms(build, device, warmup=1, reps=3)  # uncached: to_block_mask caches
    if gpu:
        return (lambda q, k, v, s: croc.mixed_attention(q, k, v, mask, scale=s, backend="flex")), setup_ms
    block_mask = mask.to_block_mask()
    return (
        lambda q, k, v, s: flex_attention(q, k, v, block_mask=block_mask, scale=s, enable_gqa=True)
    ), setup_ms


def _dense_mask(mask: croc.MixedMask, kind: str, device: str) -> tuple[torch.Tensor, float, str]:
    """(bool [B, 1, L, L] mask, build ms, label) of the sdpa-dense provider."""
    if kind != "gemma3":
        return mask.to_dense()[:, None], 0.0, "sdpa-dense"
    build = lambda: layouts.transformers_dense_mask(mask.batch_size, mask.num_queries, device)  # noqa: E731
    setup_ms = common.median_ms(build, device, warmup=1, reps=3)
    return build(), setup_ms, "sdpa-hf-mask"


def make_provider(
    name: str, mask: croc.MixedMask, q: torch.Tensor, device: str, kind: str = ""
) -> tuple[Callable, float, str]:
    """(attention fn(q, k, v, scale), setup ms, label) for one provider (``kind``: the layout)."""
    if name == "croc":
        backend = "auto" if device.startswith("cuda") else "reference"
        label = "croc" if device.startswith("cuda") else "croc-reference"
        return (lambda q, k, v, s: croc.mixed_attention(q, k, v, mask, scale=s, backend=backend)), 0.0, label
    if name == "croc-index":
        if not device.startswith("cuda"):
            raise Unavailable("the Triton path is not timed on the CPU")
        index_mask = croc.MixedMask(mask.kv_start, mask.kv_end, mask.num_keys, monotone=False)
        return (
            (lambda q, k, v, s: croc.mixed_attention(q, k, v, index_mask, scale=s, backend="triton")),
            0.0,
            name,
        )
    if name == "sdpa-dense":
        dense, setup_ms, label = _dense_mask(mask, kind, device)
        return (
            (
                lambda q, k, v, s: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=dense, scale=s, enable_gqa=True
                )
            ),
            setup_ms,
            label,
        )
    if name.startswith("sdpa-causal-"):
        if not device.startswith("cuda"):
            raise Unavailable("SDPA flash/cuDNN backends need CUDA")
        return _sdpa_causal(name.rsplit("-", 1)[1]), 0.0, name
    if name == "flex":
        run, setup_ms = _flex(mask, q, device)
        return run, setup_ms, name if device.startswith("cuda") else "flex-eager"
    if name == "croc-flex":
        run, setup_ms = _croc_flex(mask, device)
        return run, setup_ms, name if device.startswith("cuda") else "croc-flex-eager"
    if name == "flash-attn":
        try:
            from flash_attn import flash_attn_func
        except ImportError as exc:
            raise Unavailable("flash-attn is not installed") from exc
        return (
            (
                lambda q, k, v, s: flash_attn_func(
                    *(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=s, causal=True
                ).transpose(1, 2)
            ),
            0.0,
            name,
        )
    raise ValueError(f"unknown provider {name!r}")


def _pairs(provider: str, mask: croc.MixedMask) -> int:
    if provider.startswith("sdpa-causal") or provider == "flash-attn":
        length = mask.num_queries
        return mask.batch_size * length * (length + 1) // 2
    return layouts.visible_pairs(mask)


def _timed_fn(mode: str, attn: Callable, q, k, v, scale) -> Callable[[], object]:
    if mode == "fwd":
        q0, k0, v0 = q.detach(), k.detach(), v.detach()

        def forward_only():
            with torch.no_grad():
                return attn(q0, k0, v0, scale)

        return forward_only
    grad = torch.randn_like(q)
    if mode == "bwd":
        out = attn(q, k, v, scale)
        return lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    return lambda: torch.autograd.grad(attn(q, k, v, scale), (q, k, v), grad)


def bench_case(
    args, device: str, length: int, head_dim: int, heads: tuple[int, int], kind: str
) -> list[dict]:
    heads_q, heads_kv = heads
    batch = max(1, args.tokens // length)
    start = time.perf_counter()
    mask = layouts.build_mask(batch, length, kind, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    mask_build_ms = 1e3 * (time.perf_counter() - start)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    gen = torch.Generator(device=device).manual_seed(length + head_dim)
    make = lambda h: torch.randn(batch, h, length, head_dim, device=device, dtype=dtype, generator=gen)  # noqa: E731
    q, k, v = make(heads_q).requires_grad_(), make(heads_kv).requires_grad_(), make(heads_kv).requires_grad_()
    scale = 1 / math.sqrt(head_dim)
    rows = []
    for provider in args.providers:
        base = {"mask": kind, "length": length, "batch": batch, "head_dim": head_dim, "heads_q": heads_q}
        base |= {
            "heads_kv": heads_kv,
            "dtype": str(dtype).removeprefix("torch."),
            "mask_build_ms": round(mask_build_ms, 3),
        }
        try:
            attn, setup_ms, label = make_provider(provider, mask, q, device, kind)
        except Unavailable as exc:
            rows.append(base | {"provider": provider, "status": f"unavailable: {exc}"})
            continue
        for mode in args.modes:
            row = base | {"provider": label, "mode": mode, "setup_ms": round(setup_ms, 3)}
            rows.append(
                row
                | _measure(
                    mode, attn, q, k, v, scale, device, _pairs(provider, mask), head_dim, heads_q, args
                )
            )
    return rows


def _measure(mode, attn, q, k, v, scale, device, pairs, head_dim, heads_q, args) -> dict:
    flops = 4 * head_dim * pairs * heads_q * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
    try:
        fn = _timed_fn(mode, attn, q, k, v, scale)
        ms = common.median_ms(fn, device, warmup=args.warmup, reps=args.reps)
        peak = common.peak_memory_mib(fn, device)
    except torch.OutOfMemoryError:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return {"status": "oom"}
    except Exception as exc:  # a provider failing must not lose the other providers' numbers
        return {"status": f"error: {type(exc).__name__}: {str(exc)[:200]}"}
    return {
        "status": "ok",
        "ms": round(ms, 4),
        "tflops": round(flops / ms / 1e9, 2),
        "peak_mib": round(peak, 1),
        "visible_pairs": pairs,
    }


def plot(rows: list[dict], path: Path) -> Path | None:
    """TFLOP/s against L per provider: one panel per (mask, mode), first head config only."""
    plt = common.pyplot()
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok or plt is None:
        return None
    first = (ok[0]["head_dim"], ok[0]["heads_q"], ok[0]["heads_kv"])
    ok = [r for r in ok if (r["head_dim"], r["heads_q"], r["heads_kv"]) == first]
    masks = sorted({r["mask"] for r in ok})
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    fig, axes = plt.subplots(
        len(masks), len(modes), figsize=(4.5 * len(modes), 3.5 * len(masks)), squeeze=False
    )
    for i, kind in enumerate(masks):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for provider in sorted({r["provider"] for r in ok}):
                pts = sorted(
                    (r["length"], r["tflops"])
                    for r in ok
                    if (r["mask"], r["mode"], r["provider"]) == (kind, mode, provider)
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{kind} mask, {mode}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s (visible pairs)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{ok[0]['device']}, D={first[0]}, Hq/Hkv={first[1]}/{first[2]}, {ok[0]['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(rows: list[dict]) -> list[dict]:
    """croc's fwd+bwd (or fwd) throughput and its ratio to each peer, per case."""
    table = []
    ok = [r for r in rows if r.get("status") == "ok"]
    keys = sorted(
        {(r["mask"], r["length"], r["head_dim"], r["heads_q"], r["heads_kv"], r["mode"]) for r in ok}
    )
    for key in keys:
        case = {
            r["provider"]: r
            for r in ok
            if (r["mask"], r["length"], r["head_dim"], r["heads_q"], r["heads_kv"], r["mode"]) == key
        }
        ours = case.get("croc") or case.get("croc-reference")
        if ours is None:
            continue
        entry = dict(zip(("mask", "L", "D", "Hq", "Hkv", "mode"), key)) | {
            "croc_tflops": ours["tflops"],
            "croc_ms": ours["ms"],
        }
        for name, row in case.items():
            if row is not ours:
                entry[f"x_vs_{name}"] = round(row["ms"] / ours["ms"], 2)
        table.append(entry)
    return table


def parse_args(argv=None):
    parser = common.base_parser(__doc__, "tiny sizes (CPU smoke test)")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--head-dims", type=int, nargs="+")
    parser.add_argument("--heads", nargs="+", help="Hq/Hkv pairs, e.g. 32/32 28/4")
    parser.add_argument("--masks", nargs="+", choices=layouts.MASK_KINDS)
    parser.add_argument("--modes", nargs="+", choices=MODES)
    parser.add_argument("--providers", nargs="+")
    parser.add_argument("--tokens", type=int, help="tokens per batch: B = max(1, tokens // L)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument(
        "--schedule",
        choices=("range", "index", "both"),
        default="range",
        help="croc's tile schedule: range (croc), index lists (croc-index) or both, for the A/B",
    )
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    quick_or = lambda value, quick, full: value if value is not None else (quick if args.quick else full)  # noqa: E731
    args.lengths = quick_or(args.lengths, [256, 640], [1024, 2048, 4096, 8192, 16384])
    args.head_dims = quick_or(args.head_dims, [64], [64, 128])
    args.heads = [
        tuple(int(x) for x in h.split("/")) for h in quick_or(args.heads, ["4/2"], ["32/32", "28/4"])
    ]
    args.masks = quick_or(args.masks, ["croc", "causal", "gemma3"], list(layouts.MASK_KINDS))
    args.modes = args.modes or (list(MODES) if gpu else ["fwd"])
    args.providers = args.providers or list(GPU_PROVIDERS if gpu else CPU_PROVIDERS)
    if "croc" in args.providers and args.schedule != "range":
        at = args.providers.index("croc")
        args.providers[at : at + 1] = ["croc", "croc-index"] if args.schedule == "both" else ["croc-index"]
    args.tokens = args.tokens or (1024 if args.quick else TOKENS_PER_BATCH)
    if args.quick:
        args.warmup, args.reps = 1, 3
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    tqdm = common.progress_bar()

    if not args.device.startswith("cuda"):
        print(
            "attention benchmark on the CPU: croc runs its reference backend here; the Triton path is not timed on the CPU"
        )
    env = common.environment(args.device)
    cases = [
        (L, d, h, m) for m in args.masks for h in args.heads for d in args.head_dims for L in args.lengths
    ]
    rows = []
    stem = f"attention_{'gpu' if args.device.startswith('cuda') else 'cpu'}{args.tag}"
    for length, head_dim, heads, kind in tqdm(cases, desc="attention", unit="case"):
        rows += [env | r for r in bench_case(args, args.device, length, head_dim, heads, kind)]
        csv_path = common.write_csv(args.out / f"{stem}.csv", rows)  # after every case: nothing lost
    png_path = plot(rows, args.out / f"{stem}.png")
    print(f"wrote {csv_path}" + (f" and {png_path}" if png_path else ""))
    table = summary(rows)
    if table:
        common.print_table(table, list(table[0].keys()))
    return rows


if __name__ == "__main__":
    main()
