"""Linearize a pretrained softmax classifier: swap every attention for a linear mixer, then recover its accuracy.

The student is the teacher with each softmax attention replaced by ``student.mixer`` (q/k/v/proj inherited;
:func:`linvision.linearized.linearize_classifier`). Then, with accelerate:

1. **attention transfer** (``transfer.epochs``) on the training images without their labels: only the
   mixers' new parameters (Hedgehog feature maps, LoLCATs window factors) train, against each layer's
   softmax weights (cross-entropy, in query chunks) and outputs (MSE), every layer fed the teacher's own
   activations (:mod:`linvision.distill.transfer`); skipped when the mixer adds no parameter (liger, linear);
2. **fine-tuning** (``train.epochs``): KL to the teacher's logits plus the label loss, with LoRA (peft) on
   the attention projections and the new parameters, or the whole model (``finetune.mode``).

Top-1 of teacher and student after every epoch (and of the student before any training, epoch 0).
Writes to ``train.output_dir``: ``config.yaml``, ``checkpoint.pt`` (resumable: same data order and random
state as an uninterrupted run), ``metrics.jsonl``, ``metrics.png`` and ``student/`` (timm's
``config.json`` + ``model.safetensors``, LoRA merged; :func:`linvision.linearized.load_pretrained`, or
``timm.create_model("local-dir:<dir>/student")`` for linvit students).

Examples:
  linvision classify --config configs/classify/digits_linear.yaml model.mixer=softmax \\
      train.output_dir=runs/digits_softmax                               # the teacher (minutes, CPU)
  linvision linearize --config configs/linearize/digits_lolcats.yaml     # minutes, CPU
  linvision linearize --config configs/linearize/digits_lolcats.yaml student.mixer=hedgehog student.options={}
  accelerate launch --multi_gpu --num_processes 8 -m linvision.train.linearize \\
      --config configs/linearize/deit_small_lolcats.yaml data.root=/data/imagenet
"""
from __future__ import annotations

import argparse
import functools
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import rng
from .build import build_optimizer, check_input_size, scaled_lr
from .checkpoint import atomic_write, load_checkpoint, remove_stale_temporaries
from .classify import Progress, _check_resumable, _restore, _save, _train_epoch, evaluate
from .config import ConfigError
from .data import EpochSampler, build_datasets, build_loader
from .job_cli import ConfigJob, say
from .linearize_config import LinearizeConfig, describe, load_linearize_config
from .metrics import MetricsLog, plot_metrics
from .resume import checkpoint_to_resume
from .schedule import build_scheduler


# --- models -----------------------------------------------------------------------------------------------


def load_teacher(cfg: LinearizeConfig, num_classes: int) -> nn.Module:
    """The softmax classifier: a ``linvision classify`` run directory, or a timm name with pretrained weights."""
    import linvision  # noqa: F401  (registers linvit)

    t = cfg.teacher
    if t.name is not None:
        try:
            model = timm.create_model(t.name, pretrained=True)
        except Exception as err:  # noqa: BLE001  (unknown names, no weights offline: one line for the user)
            raise ConfigError(f"teacher.name: cannot load {t.name!r} with pretrained weights: {err}") from None
        if model.num_classes != num_classes:
            raise ConfigError(f"teacher {t.name} has {model.num_classes} classes, the data {num_classes}")
        return model
    from linvision.diffusers.files import read_safetensors

    run_dir = Path(t.path)
    weights = run_dir / ("model_ema.safetensors" if t.weights == "ema" else "model.safetensors")
    config = run_dir / "config.yaml"
    if not weights.is_file() or not config.is_file():
        raise ConfigError(f"teacher.path: {run_dir} has no config.yaml and {weights.name} (a finished classify run)")
    try:
        model_cfg = dict(yaml.safe_load(config.read_text())["model"])
        name = model_cfg.pop("name")
        model_cfg["num_classes"] = num_classes
        model = timm.create_model(name, **model_cfg)
    except (yaml.YAMLError, OSError, UnicodeDecodeError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"teacher.path: {config} is not the config of a classify run with a buildable model "
                          f"({type(err).__name__}: {err})") from None
    try:
        state = read_safetensors(str(weights))
    except ValueError as err:
        raise ConfigError(f"teacher.path: {err}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(f"teacher.path: {weights} does not fit {name} with {num_classes} classes: "
                          f"{str(err).splitlines()[0]}") from None
    return model


def build_student(cfg: LinearizeConfig, teacher: nn.Module) -> nn.Module:
    from linvision.linearized import linearize_classifier

    try:
        return linearize_classifier(teacher, cfg.student.mixer, cfg.student.options, cfg.student.strict)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"student: {err}") from None


def check_student(cfg: LinearizeConfig, student: nn.Module, teacher: nn.Module) -> None:
    """ConfigError unless the student takes ``data.img_size`` images and (stage 2 with LoRA) the LoRA targets
    name linears inside its attention blocks: checked before anything is written."""
    from linvision.distill.lora import lora_target_pattern

    built = getattr(getattr(teacher, "patch_embed", None), "img_size", None)
    built = built[0] if isinstance(built, (tuple, list)) else built
    check_input_size(student, cfg, what=f"the student of teacher {cfg.teacher.name or cfg.teacher.path}",
                     remedy="give the size the teacher was built for" + (f" ({built})" if built else ""))
    if cfg.finetune.mode != "lora" or not cfg.train.epochs:
        return
    try:
        pattern = lora_target_pattern(cfg.finetune.lora_targets)
    except ValueError as err:
        raise ConfigError(f"finetune.lora_targets: {err}") from None
    if not any(isinstance(m, nn.Linear) and re.fullmatch(pattern, n) for n, m in student.named_modules()):
        raise ConfigError(f"finetune.lora_targets: {cfg.finetune.lora_targets} match no linear inside the "
                          "student's attention blocks (blocks.<i>.attn...)")


def without_lora(state_dict: Any) -> Any:
    """A stage-2 checkpoint's model state with peft's LoRA keys dropped and ``base_layer`` folded back, so that
    its names match the student's before LoRA (anything else is returned as is, for the checks to refuse)."""
    if not isinstance(state_dict, dict):
        return state_dict
    return {k.replace(".base_layer.", "."): v for k, v in state_dict.items() if ".lora_" not in k}


# --- stages -----------------------------------------------------------------------------------------------


def stage_epochs(cfg: LinearizeConfig, student: nn.Module) -> Tuple[int, int]:
    """Epochs of stage 1 (0 when the mixers add no parameters) and of stage 2 (0 for ``finetune.mode=none``)."""
    from linvision.distill import new_parameter_names

    first = cfg.transfer.epochs if new_parameter_names(student) else 0
    return first, (0 if cfg.finetune.mode == "none" else cfg.train.epochs)


class Stage:
    """One stage's trainable parameters, optimizer, schedule and loss (``compute_loss(model, x, y)``)."""

    def __init__(self, index: int, model: nn.Module, optimizer, scheduler, compute_loss, transfer=None):
        self.index, self.model, self.optimizer, self.scheduler = index, model, optimizer, scheduler
        self.compute_loss, self.transfer = compute_loss, transfer

    def close(self) -> None:
        if self.transfer is not None:
            self.transfer.remove()


def setup_stage(index: int, cfg: LinearizeConfig, accelerator: Accelerator, student: nn.Module, teacher: nn.Module,
                steps: int) -> Stage:
    """Make stage ``index`` (1: transfer, 2: fine-tuning) ready to train ``steps`` optimizer steps."""
    from linvision.distill import AttentionTransfer, select_new_parameters
    from linvision.distill.lora import add_lora

    if index == 1:
        tr = cfg.transfer
        select_new_parameters(student)
        transfer = AttentionTransfer(student, weights=tr.weights > 0, outputs=tr.outputs > 0, chunk=tr.chunk,
                                     teacher_forcing=tr.teacher_forcing)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay)
        scheduler = build_scheduler(optimizer, steps, 0, tr.lr, tr.lr, tr.min_lr)

        def compute_loss(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
            model.eval()  # no drop-path / dropout: each layer sees exactly the teacher's activations
            model(x)
            return transfer.loss(tr.weights, tr.outputs)["loss"]

        model, optimizer = accelerator.prepare(student, optimizer)
        return Stage(1, model, optimizer, scheduler, compute_loss, transfer)
    f = cfg.finetune
    if f.mode == "lora":
        from linvision.distill import new_parameter_names

        extra = set(new_parameter_names(student))
        try:
            add_lora(student, f.lora_rank, f.lora_alpha, f.lora_targets)
        except ValueError as err:
            raise ConfigError(f"finetune: {err}") from None
        for name, p in student.named_parameters():
            if name in extra:
                p.requires_grad_(True)
    else:
        student.requires_grad_(True)
    world = accelerator.num_processes
    lr = scaled_lr(cfg, cfg.data.batch_size * world * cfg.train.accum_steps)
    optimizer = build_optimizer(student, cfg, lr)
    warmup = int(round(cfg.train.warmup_epochs * steps / max(1, cfg.train.epochs)))
    scheduler = build_scheduler(optimizer, steps, warmup, lr, cfg.train.warmup_lr, cfg.train.min_lr)
    temperature = f.temperature

    def compute_loss(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        logits = model(x).float()
        loss = f.label * F.cross_entropy(logits, target, label_smoothing=cfg.train.label_smoothing)
        if f.kl > 0:
            with torch.no_grad():
                teacher_logits = teacher(x).float()
            kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                          log_target=True, reduction="batchmean")
            loss = loss + f.kl * temperature**2 * kl
        return loss

    model, optimizer = accelerator.prepare(student, optimizer)
    return Stage(2, model, optimizer, scheduler, compute_loss)


# --- the job ----------------------------------------------------------------------------------------------


def run(cfg: LinearizeConfig) -> Dict[str, Any]:
    """Linearize and train as configured; returns the last epoch's record (empty if stopped by max_steps)."""
    with rng.cpu_threads(cfg.train.threads):
        return _run(cfg)


_say = functools.partial(say, job="linearize")  # _say(accelerator, message)


def _run(cfg: LinearizeConfig) -> Dict[str, Any]:
    t = cfg.train
    accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.accum_steps,
                              cpu=t.cpu, step_scheduler_with_optimizer=False)
    rng.seed_everything(t.seed)
    splits = build_datasets(cfg)
    teacher = load_teacher(cfg, len(splits.classes))
    student = build_student(cfg, teacher)
    check_student(cfg, student, teacher)
    out = Path(t.output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    bs = cfg.data.batch_size
    sampler = EpochSampler(len(splits.train), bs, t.seed, rank, world, shuffle=True, multiple_of=t.accum_steps)
    steps_per_epoch = sampler.num_batches() // t.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(splits.train)} training images are too few for batch_size {bs} x {world} "
                          f"processes x accum_steps {t.accum_steps}")
    resume_path = checkpoint_to_resume(cfg.train.resume, out)
    state = None
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        plain = dict(state, **({"model": without_lora(state["model"])} if "model" in state else {}))
        _check_resumable(plain, resume_path, cfg, student, kind="linearize")
    if accelerator.is_main_process:  # only once config, teacher, student, data and checkpoint are known valid
        remove_stale_temporaries(out)
        out.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(text))
    student = student.to(accelerator.device)
    teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
    first, second = stage_epochs(cfg, student)
    if cfg.transfer.epochs and not first:
        _say(accelerator, f"{cfg.student.mixer}: the mixers add no parameters, so attention transfer is skipped")
    val_sampler = EpochSampler(len(splits.val), cfg.data.eval_batch_size or 2 * bs, rank=rank, num_replicas=world,
                               shuffle=False)
    val_loader = build_loader(splits.val, val_sampler, val_sampler.batch_size, cfg.data.num_workers, t.seed,
                              pin_memory=accelerator.device.type == "cuda", train=False)
    teacher_top1 = evaluate(teacher, val_loader, accelerator)["top1"]
    rng.seed_everything(t.seed + rank)

    log = MetricsLog(out / "metrics.jsonl")
    progress = Progress()
    if state is None and accelerator.is_main_process:
        log.truncate(-1)
        _log_epoch(accelerator, log, out, _record(accelerator, student, val_loader, progress, 0, teacher_top1))
    stage: Optional[Stage] = None
    record: Dict[str, Any] = {}
    _say(accelerator, f"{cfg.student.mixer}: {first} transfer + {second} fine-tuning epochs of {steps_per_epoch} "
         f"steps; teacher top-1 {teacher_top1:.2f}")
    while True:
        epoch = state["epoch"] if state is not None else progress.epoch
        if epoch >= first + second:
            break
        index = 1 if epoch < first else 2
        if stage is None or stage.index != index:
            if stage is not None:
                stage.close()
            stage = setup_stage(index, cfg, accelerator, accelerator.unwrap_model(stage.model) if stage else student,
                                teacher, steps_per_epoch * (first if index == 1 else second))
            if state is not None:
                progress = _restore(state, cfg, accelerator, stage.model, stage.optimizer, stage.scheduler, None)
                _say(accelerator, f"resumed from {resume_path} at epoch {progress.epoch}, step {progress.global_step}")
                state = None
            elif progress.epoch == first and index == 2 and first:
                _save(accelerator, cfg, out, stage.model, stage.optimizer, stage.scheduler, None, progress)
        start = time.perf_counter()
        if accelerator.is_main_process:
            log.truncate(progress.epoch)
        stopped = _train_epoch(cfg, accelerator, stage.model, stage.optimizer, stage.scheduler, None, None, None,
                               splits.train, sampler, steps_per_epoch, progress, out, compute_loss=stage.compute_loss)
        if stopped:
            stage.close()
            return {}
        if stage.transfer is not None:
            stage.transfer.enabled = False  # evaluate the student's own attention
        record = _record(accelerator, stage.model, val_loader, progress, index, teacher_top1,
                         lr=stage.scheduler.get_last_lr()[0], epoch_time=time.perf_counter() - start)
        if stage.transfer is not None:
            stage.transfer.enabled = True
        _log_epoch(accelerator, log, out, record)
        if not (index == 1 and progress.epoch == first and second):  # else saved once stage 2 is set up
            _save(accelerator, cfg, out, stage.model, stage.optimizer, stage.scheduler, None, progress)
    final = accelerator.unwrap_model(stage.model) if stage is not None else student
    if stage is not None:
        stage.close()
    if accelerator.is_main_process:
        _export(cfg, final, out / "student")
    accelerator.wait_for_everyone()
    return record or (log.read()[-1] if accelerator.is_main_process and log.read() else {})


def _record(accelerator: Accelerator, model: nn.Module, val_loader, progress: Progress, stage: int,
            teacher_top1: float, lr: float = 0.0, epoch_time: float = 0.0) -> Dict[str, Any]:
    """Evaluate the student; returns the epoch's record and resets the epoch counters of ``progress``."""
    sums = accelerator.reduce(torch.tensor([progress.loss_sum, progress.samples], dtype=torch.float64,
                                           device=accelerator.device), reduction="sum")
    metrics = evaluate(accelerator.unwrap_model(model), val_loader, accelerator)
    record: Dict[str, Any] = {"epoch": progress.epoch + (1 if stage else 0), "stage": stage,
                              "step": progress.global_step, "lr": float(lr),
                              "train_loss": float(sums[0]) / max(float(sums[1]), 1.0),
                              **{f"val_{k}": v for k, v in metrics.items()}, "teacher_val_top1": teacher_top1,
                              "epoch_time_s": epoch_time}
    if stage:
        progress.epoch += 1
        progress.step_in_epoch, progress.loss_sum, progress.samples = 0, 0.0, 0
    return record


def _log_epoch(accelerator: Accelerator, log: MetricsLog, out: Path, record: Dict[str, Any]) -> None:
    if not accelerator.is_main_process:
        return
    log.append(record)
    plot_metrics([r for r in log.read() if r["stage"]], out / "metrics.png")
    names = {0: "linearized, untrained", 1: "transfer", 2: "fine-tune"}
    tqdm.write(f"[linearize] epoch {record['epoch']} ({names[record['stage']]}): train loss {record['train_loss']:.4g}, "
               f"student top-1 {record['val_top1']:.2f}, teacher top-1 {record['teacher_val_top1']:.2f}")


def _export(cfg: LinearizeConfig, model: nn.Module, folder: Path) -> None:
    """The student with LoRA merged, as a timm checkpoint (:func:`linvision.linearized.save_pretrained`)."""
    from linvision.distill.lora import merge_lora
    from linvision.linearized import save_pretrained

    save_pretrained(merge_lora(model), folder)


JOB = ConfigJob("linearize", __doc__, "configs/linearize/digits_lolcats.yaml",
                "transfer.epochs=1 student.mixer=hedgehog", describe, load_linearize_config, run,
                formatter_class=argparse.RawDescriptionHelpFormatter)
add_arguments, main, cli = JOB.add_arguments, JOB.main, JOB.cli  # for linvision.cli and python -m


if __name__ == "__main__":
    sys.exit(cli())
