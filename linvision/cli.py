"""The ``linvision`` command: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .cli_text import PlainHelpFormatter

# subcommand -> (module with add_arguments(parser) and main(args), one-line help)
JOBS = {
    "bench": ("linvision.benchmarks.run", "time and peak memory of every mixer against softmax at growing resolution"),
    "classify": ("linvision.train.classify", "train an image classifier (ImageFolder or the built-in digits) with accelerate"),
    "distill": ("linvision.train.distill", "distill a softmax diffusion denoiser into a linear-attention adapter with accelerate"),
    "linearize": ("linvision.train.linearize", "turn a pretrained softmax classifier into a linear-attention one: attention transfer, then distillation"),
    "sample": ("linvision.sample.sample", "draw images with a diffusers pipeline and a linvision adapter, at any resolution"),
    "demo": ("linvision.demo", "the whole story on the built-in digits: classify, train a DiT, distill, sample, score, report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linvision",
        description="Linear-attention blocks for vision and diffusion: benchmarks and jobs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in JOBS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(
            sub.add_parser(
                name, help=help_text, description=module.__doc__, formatter_class=PlainHelpFormatter
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
    if args.command in JOBS:
        return importlib.import_module(JOBS[args.command][0]).main(args)
    print(mixers_table())
    return 0


def mixers_table() -> str:
    """``linvision mixers``: one line per registered mixer, its options after a column as wide as the longest name."""
    from .mixers import list_mixers, mixer_options

    names = list_mixers()
    width = max(len(n) for n in names)
    return "\n".join(
        f"{name:<{width}}  {', '.join(o for o in mixer_options(name) if o not in ('dim', 'num_heads'))}".rstrip()
        for name in names
    )


if __name__ == "__main__":
    sys.exit(main())
