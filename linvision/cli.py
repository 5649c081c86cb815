"""The ``linvision`` command: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linvision",
        description="Linear-attention blocks for vision and diffusion: benchmarks and jobs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .benchmarks import run as bench

    bench.add_arguments(
        sub.add_parser(
            "bench",
            help="time and peak memory of every mixer against softmax at growing resolution",
            description=bench.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    from .train import classify

    classify.add_arguments(
        sub.add_parser(
            "classify",
            help="train an image classifier (ImageFolder or the built-in digits) with accelerate",
            description=classify.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    from .train import distill

    distill.add_arguments(
        sub.add_parser(
            "distill",
            help="distill a softmax diffusion denoiser into a linear-attention adapter with accelerate",
            description=distill.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    from .sample import sample

    sample.add_arguments(
        sub.add_parser(
            "sample",
            help="draw images with a diffusers pipeline and a linvision adapter, at any resolution",
            description=sample.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    from . import demo

    demo.add_arguments(
        sub.add_parser(
            "demo",
            help="the whole story on the built-in digits: classify, train a DiT, distill, sample, score, report",
            description=demo.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    sub.add_parser("mixers", help="list the registered mixers and their options")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "bench":
        from .benchmarks import run as bench

        return bench.main(args)
    if args.command == "classify":
        from .train import classify

        return classify.main(args)
    if args.command == "distill":
        from .train import distill

        return distill.main(args)
    if args.command == "sample":
        from .sample import sample

        return sample.main(args)
    if args.command == "demo":
        from . import demo

        return demo.main(args)
    if args.command == "mixers":
        from .mixers import list_mixers, mixer_options

        for name in list_mixers():
            print(f"{name:10s} {', '.join(o for o in mixer_options(name) if o not in ('dim', 'num_heads'))}")
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
