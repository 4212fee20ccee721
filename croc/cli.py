"""Command line: ``croc demo``."""

from __future__ import annotations

import argparse
import time

import torch

import croc


def _attention_showcase() -> None:
    """Until the training pipeline lands, the demo shows the mask and the attention on the CPU."""
    print("croc demo: mixed mask + reference attention showcase (the training demo is not built yet)")
    image = torch.zeros(2, 24, dtype=torch.bool)
    image[0, 3:11] = True
    image[1, 5:9] = True
    image[1, 14:20] = True
    attention_mask = torch.ones(2, 24, dtype=torch.long)
    attention_mask[1, 22:] = 0
    mask = croc.MixedMask.from_image_mask(image, attention_mask)
    print("row 0 (image at 3..10), dense mask:")
    for row in mask.to_dense()[0].int().tolist():
        print("   " + "".join("x" if v else "." for v in row))
    q, k, v = (torch.randn(2, 4, 24, 32) for _ in range(3))
    t0 = time.perf_counter()
    out = croc.mixed_attention(q, k, v, mask)
    print(
        f"mixed_attention out {tuple(out.shape)} in {1e3 * (time.perf_counter() - t0):.2f} ms; "
        f"padding rows are zero: {bool(out[1, :, 22:].eq(0).all())}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="croc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the demo on the embedded synthetic default")
    args = parser.parse_args(argv)
    if args.command == "demo":
        _attention_showcase()


if __name__ == "__main__":
    main()
