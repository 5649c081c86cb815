"""Distill a small trained softmax DiT into a linear-attention student on the CPU, and measure how much closer
the student's samples get to the teacher's from the same noise.

1. Trains the digits teacher (``python -m linvision.train.digits_dit``: a VAE and a 4-block softmax DiT on
   scikit-learn's digits, 16 px) unless ``--teacher`` already holds one.
2. Runs ``linvision distill`` with ``configs/distill/tiny_dit_digits.yaml`` (LiT student by default) on it.
3. Reports the per-pixel MSE between teacher and student samples (images in [0, 1], same class labels and
   seeds, hence the same initial noise) before and after distillation, the first and last loss terms, the
   wall time and where the loss curves and sample grids are.

    python -m linvision.benchmarks.distill_digits --out runs/distill_digits
    python -m linvision.benchmarks.distill_digits --out runs/distill_digits student.mechanism=linfusion train.steps=800

Extra arguments are ``linvision distill`` overrides.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from ..cli_text import PlainHelpFormatter
from ..configs import ROOT as CONFIGS

DEFAULT_CONFIG = CONFIGS / "distill" / "tiny_dit_digits.yaml"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linvision.benchmarks.distill_digits", description=__doc__,
                                     formatter_class=PlainHelpFormatter)
    parser.add_argument("--out", default="runs/distill_digits", help="folder for the teacher and the run")
    parser.add_argument("--teacher", default=None, help="an existing digits DiT pipeline (default: OUT/teacher, "
                                                        "trained if missing)")
    parser.add_argument("--quick", action="store_true", help="a rougher teacher (about a minute)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="distill config (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="linvision distill overrides")
    args = parser.parse_args(argv)

    from linvision.train.digits_dit import DigitsDiTSettings, train_digits_dit
    from linvision.train.distill import run
    from linvision.train.distill_config import load_distill_config

    out = Path(args.out)
    teacher = Path(args.teacher) if args.teacher else out / "teacher"
    start = time.perf_counter()
    teacher_report = None
    if not (teacher / "model_index.json").is_file():
        settings = DigitsDiTSettings.quick() if args.quick else DigitsDiTSettings()
        teacher_report = train_digits_dit(str(teacher), settings, threads=args.threads)
    teacher_s = time.perf_counter() - start
    if not Path(args.config).is_file():
        raise SystemExit(f"no distill config at {args.config} (run from a clone, or pass --config)")
    overrides = [f"pipeline.model={teacher}", f"train.output_dir={out / 'distill'}",
                 f"data.cache_dir={out / 'latents'}", f"train.threads={args.threads}", *args.overrides]
    cfg = load_distill_config(args.config, overrides)
    start = time.perf_counter()
    result = run(cfg)
    report = {
        "teacher": str(teacher),
        "teacher_train_s": round(teacher_s, 1) if teacher_report else None,
        "student": cfg.student.mechanism,
        "steps": result["steps"],
        "distill_s": round(time.perf_counter() - start, 1),
        "sample_mse_before": result.get("sample_mse_start"),
        "sample_mse_after": result.get("sample_mse_end"),
        "loss_first": result.get("first"),
        "loss_last": result.get("last"),
        "losses_png": result["losses_png"],
        "grid_end": result.get("grid_end"),
        "images": f"{len(cfg.eval.class_labels) * len(cfg.eval.seeds)} samples, {cfg.eval.steps} DDIM steps, "
                  f"guidance {cfg.eval.guidance}, {cfg.eval.resolution or cfg.data.resolution} px",
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
