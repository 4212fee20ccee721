"""Command line: ``croc demo`` and ``croc train``.

croc demo [--quick] [--out runs/demo]     the three stages on the embedded synthetic default
croc train --stage ... [TrainingArguments flags]   one stage on LLaVA JSON data (see ``croc train -h``)
"""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> None:
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
    _demo(args)


if __name__ == "__main__":
    main()
