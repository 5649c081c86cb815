"""Linearization recipes on the digits ViT, at the same budget and seed: which recovers the teacher best?

1. Trains the softmax teacher (``linvision classify`` with ``configs/classify/digits_linear.yaml``,
   ``model.mixer=softmax``) unless ``--teacher`` holds a finished run.
2. Runs ``linvision linearize`` (``configs/linearize/digits_lolcats.yaml``) once per recipe, every trained
   recipe with ``--epochs`` epochs in total (stage 1 + stage 2, 44 steps each), seed 0:

   - ``linearize only``: ``linear`` (ELU+1, ``linvision.timm.linearize``'s plain swap), no training;
   - ``linearize + train``: the same, then full fine-tuning on the labels alone for every epoch;
   - ``hedgehog``: 2 epochs of attention transfer on weights (cross-entropy), then LoRA with KL + labels;
   - ``lolcats``: 2 epochs of attention transfer on outputs (MSE x 1000; LoLCATs' xent0_mse1000), then LoRA;
   - ``liger``: no stage 1 (no new parameters), LoRA with KL + labels for every epoch.

3. Prints one table: top-1 before training (the swap alone) and after, and the wall time.

    python -m linvision.benchmarks.linearize_digits --out runs/linearize_digits
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = ROOT / "configs" / "classify" / "digits_linear.yaml"
CONFIG = ROOT / "configs" / "linearize" / "digits_lolcats.yaml"


def recipes(epochs: int, transfer: int) -> Dict[str, List[str]]:
    """``linvision linearize`` overrides of each recipe (on top of ``digits_lolcats.yaml``)."""
    tuned = epochs - transfer
    return {
        "linearize only": ["student.mixer=linear", "student.options={}", "transfer.epochs=0", "finetune.mode=none"],
        "linearize + train": ["student.mixer=linear", "student.options={}", "transfer.epochs=0", "finetune.mode=full",
                              "finetune.kl=0", "finetune.label=1", f"train.epochs={epochs}"],
        "hedgehog": ["student.mixer=hedgehog", "student.options={}", f"transfer.epochs={transfer}",
                     "transfer.weights=1", "transfer.outputs=0", f"train.epochs={tuned}"],
        "lolcats": ["student.mixer=lolcats", "student.options={lolcats: {radius: 2}}", f"transfer.epochs={transfer}",
                    "transfer.weights=0", "transfer.outputs=1000", f"train.epochs={tuned}"],
        "liger": ["student.mixer=liger", "student.options={liger: {radius: 2}}", "transfer.epochs=0",
                  f"train.epochs={epochs}"],
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linvision.benchmarks.linearize_digits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/linearize_digits", help="folder for the teacher and the runs")
    parser.add_argument("--teacher", default=None, help="a finished classify run (default: OUT/teacher, trained)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of every trained recipe, both stages")
    parser.add_argument("--transfer-epochs", type=int, default=2, help="stage-1 epochs of hedgehog and lolcats")
    parser.add_argument("--only", nargs="*", default=None, help="run only these recipes")
    args = parser.parse_args(argv)

    from linvision.train.classify import run as classify
    from linvision.train.config import load_config
    from linvision.train.linearize import run as linearize
    from linvision.train.linearize_config import load_linearize_config

    out = Path(args.out)
    teacher = Path(args.teacher) if args.teacher else out / "teacher"
    if not (teacher / "model.safetensors").is_file():
        classify(load_config(str(TEACHER_CONFIG), ["model.mixer=softmax", f"train.output_dir={teacher}"]))
    rows = []
    for name, overrides in recipes(args.epochs, args.transfer_epochs).items():
        if args.only and name not in args.only:
            continue
        run_dir = out / name.replace(" ", "_").replace("+", "plus")
        cfg = load_linearize_config(str(CONFIG), [f"teacher.path={teacher}", f"train.output_dir={run_dir}",
                                                  *overrides])
        start = time.perf_counter()
        linearize(cfg)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows.append({"recipe": name, "mixer": cfg.student.mixer, "stage1": sum(r["stage"] == 1 for r in records),
                     "stage2": sum(r["stage"] == 2 for r in records),
                     "before": records[0]["val_top1"], "after": records[-1]["val_top1"],
                     "teacher": records[0]["teacher_val_top1"], "wall_s": time.perf_counter() - start})
    print(table(rows))
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    return 0


def table(rows: List[dict]) -> str:
    """A Markdown table of the runs."""
    lines = ["| recipe | mixer | transfer epochs | fine-tune epochs | top-1 untrained | top-1 final | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    if rows:
        lines.append(f"| teacher (softmax) | softmax | - | - | - | {rows[0]['teacher']:.2f} | - |")
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['mixer']} | {r['stage1']} | {r['stage2']} | {r['before']:.2f} | "
                     f"{r['after']:.2f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
