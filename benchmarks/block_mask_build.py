"""How long it takes to build FlexAttention's BlockMask for the Croc layout: ours against create_block_mask.

- ``croc-flex``: what :meth:`croc.MixedMask.to_block_mask` builds (uncached here: the tables from the
  intervals' block bounds);
- ``flex``: ``create_block_mask`` with the interval mask_mod (eager on the CPU, compiled on CUDA,
  as FlexAttention's documentation recommends there).

Both build the same tables (tests/test_flex_attention.py checks they are identical). Medians over
``--reps`` builds after one warm-up (CUDA: triton's do_bench), one row per (provider, L) in ``block_mask_build<tag>.csv``,
with the device (CPU model or card), torch version, commit and date.

Usage::

    python benchmarks/block_mask_build.py --out benchmarks/results                # L = 4096 8192 16384
    python benchmarks/block_mask_build.py --out /tmp/b --quick                    # tiny smoke run
"""

from __future__ import annotations

import common
import layouts
import torch
from torch.nn.attention.flex_attention import create_block_mask

import croc
from croc.ops.flex_attention import block_mask_from_intervals


def _interval_mask_mod(mask: croc.MixedMask):
    kv_start, kv_end = mask.kv_start, mask.kv_end

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= kv_start[b, q_idx]) & (kv_idx < kv_end[b, q_idx])

    return mask_mod


def _builders(mask: croc.MixedMask, device: str, block_size: int) -> dict:
    mask_mod = _interval_mask_mod(mask)
    build = torch.compile(create_block_mask) if device.startswith("cuda") else create_block_mask
    return {
        "croc-flex": lambda: block_mask_from_intervals(mask.kv_start, mask.kv_end, mask.num_keys, block_size),
        "flex": lambda: build(
            mask_mod, mask.batch_size, None, mask.num_queries, mask.num_keys, device=device,
            BLOCK_SIZE=block_size,
        ),
    }  # fmt: skip


def parse_args(argv=None):
    parser = common.base_parser(__doc__, "tiny sizes (smoke test)")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--mask", default="croc", choices=layouts.MASK_KINDS)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tag", default="", help="suffix of the output file name")
    args = parser.parse_args(argv)
    args.lengths = args.lengths or ([256, 512] if args.quick else [4096, 8192, 16384])
    if args.quick:
        args.reps = 2
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for length in args.lengths:
        mask = layouts.build_mask(args.batch, length, args.mask, args.device)
        for provider, build in _builders(mask, args.device, args.block_size).items():
            ms = common.median_ms(build, args.device, warmup=1, reps=args.reps)
            rows.append(
                common.environment(args.device)
                | {"provider": provider, "mask": args.mask, "batch": args.batch, "seq_len": length,
                   "block_size": args.block_size, "build_ms_median": round(ms, 3), "reps": args.reps}
            )  # fmt: skip
            print(f"{provider:>10}  L={length:>6}  {ms:10.2f} ms")
    common.write_csv(args.out / f"block_mask_build{args.tag}.csv", rows)
    return rows


if __name__ == "__main__":
    main()
