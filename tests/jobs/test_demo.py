"""``linvision demo --quick``: every stage end to end (offline, CPU), every artefact written, every number finite."""
from __future__ import annotations

import json
import math

import torch
from PIL import Image

from linvision.cli import build_parser, main as cli_main
from linvision.demo import SCALES, DemoSettings, score


def _numbers(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, float(tree)


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--out", str(out), "--seed", "0"]) == 0
    assert str(out / "report.md") in capsys.readouterr().out  # it says where the report is

    for name in ["report.md", "results.json", "loss_curves.png", "denoiser_memory.png", "real_digits.png",
                 *[f"samples_{s}x.png" for s in SCALES]]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            image.verify()
    # the stage runs: classifier weights, the teacher pipeline, the distilled adapter and its sample config
    assert (out / "classify" / "model_ema.safetensors").is_file()
    assert (out / "teacher" / "model_index.json").is_file()
    assert (out / "distill" / "adapter").is_dir() and (out / "distill" / "sample.yaml").is_file()

    results = json.loads((out / "results.json").read_text())
    numbers = dict(_numbers({k: v for k, v in results.items() if k != "settings"}))
    bad = {k: v for k, v in numbers.items() if not math.isfinite(v)}
    assert not bad, bad
    assert results["all_finite"] is True
    assert 0 <= results["classifier"]["val_top1"] <= 100
    for scale in SCALES:
        row = results["samples"][f"{scale}x"]
        assert row["student_teacher_mse"] >= 0
        for who in ("teacher", "student"):
            assert 0 <= row[who]["accuracy"] <= 100 and 1 <= row[who]["inception_score"] <= 10 + 1e-6
    real = results["samples"]["real"]  # the judge on real held-out digits: its calibration
    assert real["images"] == 360 and 0 <= real["accuracy"] <= 100
    variants = {r["variant"] for r in results["bench"]["rows"]}
    assert "softmax" in variants and len(variants) >= 2
    assert results["distill"]["steps"] == DemoSettings.for_run(True).distill_steps
    for stage in ("1 classify", "2 teacher", "3 distill", "4 sample", "5 score", "6 bench", "total"):
        assert results["times_s"][stage] >= 0
    report = (out / "report.md").read_text()
    for name in ["samples_1x.png", "samples_2x.png", "samples_4x.png", "loss_curves.png", "denoiser_memory.png",
                 "real_digits.png"]:
        assert name in report


def test_score_is_an_inception_like_measure():
    labels = list(range(10))
    perfect = score(torch.eye(10), labels)
    assert perfect["accuracy"] == 100 and abs(perfect["inception_score"] - 10) < 1e-6
    uniform = score(torch.full((10, 10), 0.1), labels)
    assert abs(uniform["inception_score"] - 1) < 1e-6 and abs(uniform["top_confidence"] - 0.1) < 1e-6


def test_demo_subcommand_is_registered():
    args = build_parser().parse_args(["demo", "--quick", "--out", "x"])
    assert args.command == "demo" and args.quick and args.out == "x" and args.seed == 0
