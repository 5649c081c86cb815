"""A tiny random-weight DiT pipeline for smoke runs of ``linvision sample`` (no download, seconds on CPU).

    python -m linvision.sample.tiny outputs/tiny-dit-pipeline
    linvision sample --config configs/sample/tiny_dit.yaml

The images are noise-like (the weights are random); it exercises the loading, adapter and writing paths.
Latent stride 16 (VAE factor 8 × patch 2), "training" resolution 32 px (``sample_size=4`` latents).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..cli_text import PlainHelpFormatter


def build_tiny_dit(folder: str, seed: int = 0) -> str:
    """Write the ``dit`` family's tiny ``DiTPipeline`` (2 blocks, 16 channels, 4-level 4…8-channel VAE, DDIM) to
    ``folder``."""
    from linvision.diffusers.families import DIT

    DIT.tiny_pipeline(seed).save_pretrained(folder)
    return folder


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linvision.sample.tiny", description=__doc__,
                                     formatter_class=PlainHelpFormatter)
    parser.add_argument("folder", help="where to write the pipeline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_dit(args.folder, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
