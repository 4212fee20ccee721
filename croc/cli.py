"""Command line: ``croc demo``, ``croc init`` and ``croc train``.

croc demo [--quick] [--out runs/demo]   the three stages on the embedded synthetic default
croc demo --ablation [--quick]          with and without the Croc stage at equal steps (ablation.md)
croc init --language_model DIR --vision_tower DIR --output_dir DIR [--dtype bfloat16]
                                        the stage-1 checkpoint from a local LLM and a CLIP tower
croc train --stage S ...                one stage on LLaVA JSON data (see ``croc train -h``)
"""

from __future__ import annotations

import argparse
import os
import sys

_INIT_DTYPES = ("bfloat16", "float16", "float32")


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _ablation(args: argparse.Namespace) -> None:
    from croc.train.ablation import run_ablation

    results = run_ablation(args.out, quick=args.quick)
    for arm, result in results.items():
        ev = result["eval"]
        print(
            f"croc demo --ablation: {arm}: caption token accuracy {ev['caption_token_accuracy']:.3f}, "
            f"QA accuracy {ev['qa_accuracy']:.3f}"
        )
    print(f"croc demo --ablation: wrote {args.out}/ablation.md")


def _demo(args: argparse.Namespace) -> None:
    if args.ablation:
        _ablation(args)
        return
    from croc.train.demo import run_demo

    metrics = run_demo(args.out, quick=args.quick)
    ev = metrics["eval"]
    print(
        f"croc demo: caption token accuracy {ev['caption_token_accuracy']:.3f} "
        f"(blind, noise images: {ev['blind_caption_token_accuracy']:.3f}), QA accuracy {ev['qa_accuracy']:.3f}"
    )
    print(f"croc demo: wrote {args.out}/metrics.json, loss.png, samples.md")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="croc", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the three stages on the embedded synthetic default")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("CROC_DEMO_QUICK", "0") == "1",
        help="a few steps per stage (smoke test, also CROC_DEMO_QUICK=1)",
    )
    demo.add_argument(
        "--ablation",
        action="store_true",
        help="train twice at equal steps, with and without the Croc stage; write OUT/ablation.md",
    )
    init = sub.add_parser("init", help="compose the stage-1 checkpoint from a local LLM and a CLIP tower")
    init.add_argument("--language_model", required=True, help="local causal LM folder (with tokenizer)")
    init.add_argument("--vision_tower", required=True, help="local CLIP (vision) model folder")
    init.add_argument("--output_dir", required=True, help="where to write the CrocLlava checkpoint")
    init.add_argument("--prompt_pool_size", type=int, default=2048, help="prompt pool tokens (2048)")
    init.add_argument(
        "--dtype",
        choices=_INIT_DTYPES,
        default="bfloat16",
        help="dtype of the saved tensors, declared in its config.json (bfloat16); croc train still "
        "trains in the dtype of its own flags (fp32 weights unless --deepspeed with --bf16/--fp16)",
    )
    sub.add_parser(
        "train", help="train one stage (projector | croc | finetune); see croc train -h", add_help=False
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        from croc.train.run import main as train_main

        train_main(rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "init":
        from croc.train.compose import compose_checkpoint

        out = compose_checkpoint(
            args.language_model,
            args.vision_tower,
            args.output_dir,
            dtype=_torch_dtype(args.dtype),
            prompt_pool_size=args.prompt_pool_size,
        )
        print(f"croc init: wrote {out}")
        return
    _demo(args)


if __name__ == "__main__":
    main()
