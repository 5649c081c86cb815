"""``linvision demo``: the whole story on scikit-learn's handwritten digits, offline, on a CPU, in minutes.

Every stage runs the library's own jobs, not copies of them:

1. **classify** — a ``linvit`` with the ``linear`` mixer, trained by ``linvision classify``
   (:func:`linvision.train.classify.run`) from ``configs/classify/digits_linear.yaml`` plus overrides;
   its EMA weights become the judge of the generated digits.
2. **teacher** — a small class-conditional softmax ``DiTTransformer2DModel`` (+ a tiny VAE) trained on
   the digits at 16 px by :mod:`linvision.train.digits_dit`, saved as a ``DiTPipeline``.
3. **distill** — the teacher distilled into a linear-attention student (LiT's recipe by default) by
   ``linvision distill`` (:func:`linvision.train.distill.run`).
4. **sample** — teacher and student from the same seeds at 1×, 2× and 4× the training resolution through
   ``linvision sample``'s code (:func:`linvision.sample.pipeline.load_pipeline`, ``attach_adapter`` and
   :func:`linvision.sample.dit.sample_dit`).
5. **score** — the classifier's accuracy / confidence / Inception-score-like measure on the samples, and
   student-vs-teacher per-pixel MSE from the same noise.
6. **bench** — time and peak memory of one DiT denoiser step against resolution, softmax vs every linear
   mixer that fits a DiT (:func:`linvision.benchmarks.denoiser_memory.denoiser_step_memory`).

Writes ``report.md``, ``results.json`` and PNGs (sample grids per scale, loss curves, the memory plot) to
``--out`` (the stage runs live in sub-folders) and prints where the report is.

    linvision demo                 # ≈ 10-15 min on 2 CPU cores
    linvision demo --quick         # about 3 minutes, rough digits (what the tests run)
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from linvision.configs import ROOT as CONFIGS
from linvision.train import rng
from linvision.train.digits_dit import DigitsDiTSettings
from linvision.train.distill_sampling import save_pair_grid
from linvision.train.job_cli import module_cli

from .report import plot_bench, plot_losses, render_report, save_grid

TRAINING_RESOLUTION = 16  # the teacher's pixels (latent 8×8 with its factor-2 VAE, patch 1: 64 tokens)
SCALES = (1, 2, 4)


@dataclass
class DemoSettings:
    """Every size and step count of the demo (``quick()`` shrinks them)."""

    seed: int = 0
    quick: bool = False
    threads: Optional[int] = None  # torch CPU threads for the demo's own work (None: torch's default)
    # 1. classifier (the epochs of configs/classify/digits_linear.yaml)
    classify_epochs: int = 30
    classify_warmup_epochs: float = 2.0
    # 2. teacher (the defaults of linvision.train.digits_dit)
    vae_steps: int = DigitsDiTSettings.vae_steps
    dit_steps: int = DigitsDiTSettings.dit_steps
    dit_lr: float = DigitsDiTSettings.dit_lr
    teacher_batch: int = DigitsDiTSettings.batch_size
    # 3. distillation
    mechanism: str = "lit"
    distill_steps: int = 300
    distill_batch: int = 32
    # 4. sampling
    sample_steps: int = 20
    guidance: float = 2.0
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    # 6. benchmark
    bench_sizes: List[int] = field(default_factory=lambda: [8, 16, 32, 64])
    bench_width: int = 64
    bench_depth: int = 4
    bench_heads: int = 4
    bench_sdpa: str = "math"
    bench_repeat: int = 3
    bench_mechanisms: Optional[List[str]] = None  # None: every linear mixer that fits a DiT

    @classmethod
    def for_run(cls, quick: bool, seed: int = 0) -> "DemoSettings":
        if not quick:
            return cls(seed=seed)
        return cls(seed=seed, quick=True, classify_epochs=1, classify_warmup_epochs=0.2, vae_steps=40,
                   dit_steps=100, distill_steps=10, distill_batch=8, sample_steps=5, seeds=[0],
                   bench_sizes=[8, 16, 32], bench_repeat=1, bench_mechanisms=["linfusion", "lit"])


# --- small helpers --------------------------------------------------------------------------------------------


def classify_config_path() -> Path:
    """The shipped ``configs/classify/digits_linear.yaml`` (``linvision.configs``: present in a wheel install too)."""
    return CONFIGS / "classify" / "digits_linear.yaml"


def _finite(tree: Any) -> bool:
    if isinstance(tree, dict):
        return all(_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_finite(v) for v in tree)
    if isinstance(tree, float):
        return math.isfinite(tree)
    return True


# --- 1. classifier ------------------------------------------------------------------------------------------


def classify_stage(out: Path, s: DemoSettings) -> Dict[str, Any]:
    """Train the linear-attention ViT with ``linvision classify``; returns its last epoch's metrics."""
    from linvision.train.classify import run
    from linvision.train.config import load_config

    # the demo has the machine to itself: every core (the config's one thread suits a busy machine)
    overrides = [f"train.output_dir={out}", f"train.seed={s.seed}", f"train.epochs={s.classify_epochs}",
                 f"train.warmup_epochs={s.classify_warmup_epochs}", "train.resume=null", "train.mixed_precision=no",
                 "train.cpu=true", f"train.threads={s.threads or 'null'}"]
    path = classify_config_path()
    record = run(load_config(str(path), overrides))
    return {"config": str(path), "overrides": overrides,
            "metrics": record, "output_dir": str(out)}


def load_classifier(folder: Path):
    """The classify run's EMA model (else its final model) from ``folder``, in eval mode, with its config."""
    from safetensors.torch import load_file

    from linvision.train.build import build_model
    from linvision.train.config import load_config

    cfg = load_config(str(folder / "config.yaml"))
    model = build_model(cfg, 10)
    weights = folder / "model_ema.safetensors"
    if not weights.is_file():
        weights = folder / "model.safetensors"
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), cfg


@torch.no_grad()
def classifier_probs(model, cfg, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities for images ``(B, 3, H, W)`` in [0, 1], resized (bicubic) to the classifier's input
    and normalised like its evaluation transform."""
    import torch.nn.functional as F

    size = int(cfg.data.img_size)
    x = images.float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(cfg.data.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, -1, 1, 1)
    return model((x - mean) / std).softmax(-1)


def score(probs: torch.Tensor, labels: Sequence[int]) -> Dict[str, float]:
    """Accuracy (arg-max = intended class), mean probability of the intended class, mean top probability and
    the Inception score ``exp(E_x KL(p(y|x) || p(y)))`` (1: uninformative … 10: confident and diverse)."""
    y = torch.tensor(list(labels))
    p = probs.double().clamp_min(1e-12)
    marginal = p.mean(0, keepdim=True)
    kl = (p * (p.log() - marginal.log())).sum(1).mean()
    return {"accuracy": float((p.argmax(1) == y).double().mean() * 100), "intended_confidence":
            float(p[torch.arange(len(y)), y].mean()), "top_confidence": float(p.max(1).values.mean()),
            "inception_score": float(kl.exp())}


# --- 2. teacher ---------------------------------------------------------------------------------------------


def teacher_stage(out: Path, s: DemoSettings, progress: bool = True) -> Dict[str, Any]:
    """The softmax DiT teacher (``linvision.train.digits_dit``), saved as a ``DiTPipeline`` in ``out``."""
    from linvision.train.digits_dit import train_digits_dit

    settings = DigitsDiTSettings(resolution=TRAINING_RESOLUTION, vae_steps=s.vae_steps, dit_steps=s.dit_steps,
                                 dit_lr=s.dit_lr, batch_size=s.teacher_batch, seed=s.seed)
    report = train_digits_dit(str(out), settings, threads=s.threads, progress=progress)
    return {"folder": str(out), **report}


# --- 3. distillation -----------------------------------------------------------------------------------------


def distill_config_path() -> Path:
    """The shipped ``configs/distill/tiny_dit_digits.yaml``."""
    return CONFIGS / "distill" / "tiny_dit_digits.yaml"


def distill_overrides(teacher: Path, out: Path, s: DemoSettings) -> List[str]:
    """``linvision distill`` overrides of ``configs/distill/tiny_dit_digits.yaml`` (LiT on the digits teacher):
    this run's teacher, folders, seed, steps and evaluation."""
    return [f"pipeline.model={teacher}", f"student.mechanism={s.mechanism}",
                 f"data.resolution={TRAINING_RESOLUTION}", f"data.batch_size={s.distill_batch}",
                 f"data.cache_dir={out / 'cache'}", f"train.output_dir={out}", f"train.seed={s.seed}",
                 f"train.steps={s.distill_steps}", "train.mixed_precision=no", "train.cpu=true",
                 f"train.threads={s.threads or 'null'}",
                 "train.checkpoint_every=null", "train.resume=null",
                 f"train.log_every={max(1, min(10, s.distill_steps // 10))}", "eval.enabled=true", "eval.every=null",
                 "eval.class_labels=[0,1,2,3,4,5,6,7,8,9]", "eval.seeds=[0]", f"eval.steps={s.sample_steps}",
                 f"eval.guidance={s.guidance}", f"optim.warmup_steps={min(20, s.distill_steps // 5)}"]


def distill_stage(teacher: Path, out: Path, s: DemoSettings) -> Dict[str, Any]:
    """Distil the teacher into a linear-attention student with ``linvision distill`` (its config
    ``configs/distill/tiny_dit_digits.yaml`` + overrides); returns its result plus the ``linvision sample``
    config it wrote (``sample.yaml``: the pipeline and adapter to load)."""
    import yaml

    from linvision.train.distill import run
    from linvision.train.distill_config import load_distill_config

    path = distill_config_path()
    overrides = distill_overrides(teacher, out, s)
    result = run(load_distill_config(str(path), overrides))
    sample_cfg = yaml.safe_load((out / "sample.yaml").read_text())
    return {"config": str(path), "overrides": overrides,
            "result": result, "pipeline": sample_cfg["pipeline"]["model"],
            "adapter": sample_cfg["pipeline"]["adapter"], "output_dir": str(out)}


# --- 4. sampling ---------------------------------------------------------------------------------------------


def sample_stage(teacher: str, student_pipeline: str, adapter: str, s: DemoSettings, bar=None) -> Dict[str, Any]:
    """Images ``{"teacher"|"student": {scale: (B, 3, R, R) in [0, 1]}}`` and their labels: every digit × every
    seed, the same noise for both, through ``linvision sample``'s loading and DiT sampling loop."""
    from linvision.sample.dit import sample_dit
    from linvision.sample.pipeline import attach_adapter, load_pipeline

    labels = [d for _ in s.seeds for d in range(10)]  # one row of digits 0-9 per seed
    seeds = [seed for seed in s.seeds for _ in range(10)]
    images: Dict[str, Dict[int, torch.Tensor]] = {}
    seconds: Dict[str, Dict[int, float]] = {}
    for who in ("teacher", "student"):
        pipe = load_pipeline(teacher if who == "teacher" else student_pipeline, "float32", "cpu")
        if who == "student":
            attach_adapter(pipe, adapter)
        images[who], seconds[who] = {}, {}
        for scale in SCALES:
            size = TRAINING_RESOLUTION * scale
            generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
            start = time.perf_counter()
            images[who][scale] = sample_dit(pipe, labels, size, size, steps=s.sample_steps, guidance_scale=s.guidance,
                                            generator=generators, output_type="pt").float().cpu()
            seconds[who][scale] = round(time.perf_counter() - start, 2)
            if bar is not None:
                bar.update(1)
    return {"images": images, "labels": labels, "seeds": seeds, "seconds": seconds}


def held_out_digits(resolution: int, s: DemoSettings):
    """The classifier's validation digits as the teacher saw its training digits (8×8 upsampled bicubically to
    ``resolution``), ``(N, 3, R, R)`` in [0, 1] with labels; and the first ``len(s.seeds)`` of each class in
    the sample grids' order (one row per seed, digits 0-9)."""
    import numpy as np
    from PIL import Image

    from linvision.train.data import DigitsImages

    val = DigitsImages("val")
    arrays = [np.asarray(i.resize((resolution, resolution), Image.BICUBIC), dtype=np.float32) / 255.0
              for i in val.images]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = list(val.targets)
    first = {d: [i for i, y in enumerate(labels) if y == d] for d in range(10)}
    order = [first[d][row] for row in range(len(s.seeds)) for d in range(10)]
    return images, labels, images[order]


# --- 6. benchmark --------------------------------------------------------------------------------------------


def dit_mechanisms() -> List[str]:
    """Every registered mixer of linear cost (its class declares ``linear_cost``): each serves a DiT's
    self-attention, as every mixer takes any ``(h, w)`` grid (the mixer contract)."""
    from linvision.mixers import list_mixers, mixer_class

    return [name for name in list_mixers() if mixer_class(name).linear_cost]


def bench_stage(s: DemoSettings, mechanisms: Sequence[str], progress=None) -> List[Dict[str, Any]]:
    """Rows ``{variant, size, tokens, peak_mib, ms}`` of one CFG-batched DiT step per latent size."""
    from linvision.benchmarks.denoiser_memory import denoiser_step_memory

    rows: List[Dict[str, Any]] = []
    for size in s.bench_sizes:
        rows += denoiser_step_memory("dit", sizes=[size], adapters=list(mechanisms), width=s.bench_width,
                                     depth=s.bench_depth, heads=s.bench_heads, sdpa=s.bench_sdpa, repeat=s.bench_repeat)
        if progress is not None:
            progress.update(1)
    return rows


# --- the demo ------------------------------------------------------------------------------------------------


def run_demo(out: str = "runs/demo", quick: bool = False, seed: int = 0, progress: bool = True,
             settings: Optional[DemoSettings] = None) -> Dict[str, Any]:
    """Run every stage into ``out``; returns the numbers written to ``out/results.json``."""
    s = settings or DemoSettings.for_run(quick, seed)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    with rng.cpu_threads(s.threads or None):
        return _run_stages(root, s, progress)


def _run_stages(root: Path, s: DemoSettings, progress: bool) -> Dict[str, Any]:
    """The stages of :func:`run_demo` (on ``s.threads`` CPU threads)."""
    from tqdm.auto import tqdm

    times: Dict[str, float] = {}
    results: Dict[str, Any] = {"settings": asdict(s), "training_resolution": TRAINING_RESOLUTION, "scales": list(SCALES)}
    wall = time.perf_counter()

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        tqdm.write(f"[demo] stage {name} ...")
        start = time.perf_counter()
        rng.seed_everything(s.seed)
        value = fn()
        times[name] = round(time.perf_counter() - start, 2)
        tqdm.write(f"[demo] stage {name}: {times[name]:.1f} s")
        return value

    # 1. classifier
    c = stage("1 classify", lambda: classify_stage(root / "classify", s))
    metrics = c["metrics"]
    results["classifier"] = {"val_top1": metrics.get("val_top1"), "ema_val_top1": metrics.get("ema_val_top1"),
                             "epochs": s.classify_epochs, "config": c["config"], "overrides": c["overrides"]}
    classifier, ccfg = load_classifier(root / "classify")
    # 2. teacher
    t = stage("2 teacher", lambda: teacher_stage(root / "teacher", s, progress))
    results["teacher"] = {k: t[k] for k in ("vae_recon_mse", "scaling_factor", "train_s")}
    results["teacher"].update(dit_loss_first=t["dit_loss"][0], dit_loss_last=t["dit_loss"][-1],
                              settings=t["settings"])
    # 3. distillation
    d = stage("3 distill", lambda: distill_stage(root / "teacher", root / "distill", s))
    r = d["result"]
    results["distill"] = {"mechanism": s.mechanism, "steps": r.get("steps"), "first": r.get("first"),
                          "last": r.get("last"), "sample_mse_start": r.get("sample_mse_start"),
                          "sample_mse_end": r.get("sample_mse_end"), "config": d["config"],
                          "overrides": d["overrides"]}
    # 4. sampling
    with tqdm(total=2 * len(SCALES), desc="sample teacher/student", disable=not progress) as bar:
        samples = stage("4 sample", lambda: sample_stage(str(root / "teacher"), d["pipeline"], d["adapter"], s, bar))
    # 5. scores and grids
    def scores():
        real, real_labels, real_grid = held_out_digits(TRAINING_RESOLUTION, s)
        save_grid(real_grid, 10, root / "real_digits.png", upscale=4)
        table: Dict[str, Any] = {"real": {**score(classifier_probs(classifier, ccfg, real), real_labels),
                                          "images": len(real_labels), "grid": "real_digits.png"}}
        for scale in SCALES:
            teacher_x, student_x = samples["images"]["teacher"][scale], samples["images"]["student"][scale]
            row = {"student_teacher_mse": float(((student_x - teacher_x) ** 2).mean()),
                   "sample_s": {w: samples["seconds"][w][scale] for w in ("teacher", "student")}}
            for who, x in (("teacher", teacher_x), ("student", student_x)):
                row[who] = score(classifier_probs(classifier, ccfg, x), samples["labels"])
            row["student_minus_teacher_accuracy"] = row["student"]["accuracy"] - row["teacher"]["accuracy"]
            table[f"{scale}x"] = row
            grid = root / f"samples_{scale}x.png"
            save_pair_grid(teacher_x, student_x, grid, columns=10, separator=True, upscale=max(1, 4 // scale))
            row["grid"] = grid.name
        return table

    results["samples"] = stage("5 score", scores)
    # 6. benchmark
    def bench():
        fits = dit_mechanisms()
        mechanisms = [m for m in (s.bench_mechanisms or fits) if m in fits]
        with tqdm(total=len(s.bench_sizes), desc="denoiser step memory", disable=not progress) as bar:
            rows = bench_stage(s, mechanisms, bar)
        plot_bench(rows, root / "denoiser_memory.png")
        return {"mechanisms": mechanisms, "rows": rows}

    results["bench"] = stage("6 bench", bench)
    plot_losses(root / "classify", t, root / "distill", root / "loss_curves.png")
    times["total"] = round(time.perf_counter() - wall, 2)
    results["times_s"] = times
    results["all_finite"] = _finite({k: v for k, v in results.items() if k != "settings"})
    (root / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (root / "report.md").write_text(render_report(results, root))
    print(f"[demo] report: {root / 'report.md'} ({times['total']:.0f} s)")
    return results


# --- command line --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for the report and every artefact (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and steps: about 3 minutes, rough digits")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")


def main(args: argparse.Namespace) -> int:
    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


def cli(argv: Optional[List[str]] = None) -> int:
    """``python -m linvision.demo``."""
    return module_cli("linvision demo", __doc__, add_arguments, main, argv)
