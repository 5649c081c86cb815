"""Train an image classifier (any timm model, e.g. a linvision ``linvit_*`` with a linear mixer) with accelerate.

Reads a YAML config (``configs/classify/*.yaml``), applies ``section.key=value`` overrides, and trains with
AdamW or LAMB (no weight decay on norms, biases and position embeddings), linear warmup + cosine decay per
optimizer step, mixup/cutmix, RandAugment or DeiT-III's 3-Augment and random erasing, cross-entropy or
DeiT-III's binary cross-entropy, gradient accumulation and clipping, mixed precision and model EMA;
evaluates top-1/top-5 of the model and its EMA after every epoch.

Writes to ``train.output_dir``: ``config.yaml`` (resolved), ``checkpoint.pt`` (atomic, resumable),
``metrics.jsonl`` (one line per epoch), ``metrics.png`` (loss and accuracy), and at the end
``model.safetensors`` / ``model_ema.safetensors``.

Examples:
  linvision classify --config configs/classify/digits_linear.yaml             # offline, CPU, minutes
  linvision classify --config configs/classify/digits_linear.yaml train.epochs=3 model.mixer=lit
  linvision classify --config configs/classify/linvit_small.yaml data.root=/data/imagenet --resume
  accelerate launch --multi_gpu --num_processes 8 -m linvision.train.classify \\
      --config configs/classify/linvit_small.yaml data.root=/data/imagenet

``--resume`` (or ``train.resume=auto``) continues from ``output_dir/checkpoint.pt`` at the same optimizer
step, with the same data order, augmentation and random state as an uninterrupted run.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import rng
from linvision.models.drop_path import per_sample_drop_path

from .build import (build_criterion, build_ema, build_mixup, build_model, build_optimizer, check_input_size,
                    scaled_lr, steps_and_warmup)
from .checkpoint import atomic_write, export_safetensors, load_checkpoint, remove_stale_temporaries, save_checkpoint
from .config import Config, ConfigError, describe, load_config
from .data import EpochSampler, build_datasets, build_loader
from .job_cli import ConfigJob, say
from .metrics import MetricsLog, plot_metrics, topk_correct
from .resume import CHECKPOINT, checkpoint_to_resume, config_change_warning, load_scaler_state, scaler_state
from .schedule import build_scheduler

# keys that may differ between a run and its resumption without changing its results
RESUME_FREE = frozenset({"train.resume", "train.max_steps", "train.checkpoint_every_steps", "train.log_every",
                         "train.threads", "data.num_workers", "data.eval_batch_size"})


@dataclass
class Progress:
    """Where the run is: completed epochs, optimizer steps in the current epoch and in total, and this
    process's running sum of the training loss over the current epoch."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    samples: int = 0
    images_per_s: float = 0.0  # throughput of the last epoch (all processes); not checkpointed


# --- the job ----------------------------------------------------------------------------------------------


def run(cfg: Config) -> Dict[str, Any]:
    """Train and evaluate as configured; returns the last epoch's metrics (empty if it stopped early)."""
    with rng.cpu_threads(cfg.train.threads):
        return _run(cfg)


def _run(cfg: Config) -> Dict[str, Any]:
    t = cfg.train
    accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.accum_steps,
                              cpu=t.cpu, step_scheduler_with_optimizer=False)
    rng.seed_everything(t.seed)  # identical model init on every process
    splits = build_datasets(cfg)
    num_classes = len(splits.classes)
    model = build_model(cfg, num_classes)
    check_input_size(model, cfg)
    mixup = build_mixup(cfg, num_classes)  # neither draws random numbers
    criterion = build_criterion(cfg, mixing=mixup is not None, num_classes=num_classes)
    out = Path(t.output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    bs = cfg.data.batch_size
    lr = scaled_lr(cfg, bs * world * t.accum_steps)
    optimizer = build_optimizer(model, cfg, lr)
    sampler = EpochSampler(len(splits.train), bs, t.seed, rank, world, shuffle=True, multiple_of=t.accum_steps)
    steps_per_epoch = sampler.num_batches() // t.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(splits.train)} training images are too few for batch_size {bs} x {world} "
                          f"processes x accum_steps {t.accum_steps}")
    total_steps, warmup_steps = steps_and_warmup(cfg, steps_per_epoch)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, lr, t.warmup_lr, t.min_lr)
    resume_path = checkpoint_to_resume(cfg.train.resume, out)
    state = None
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        _check_resumable(state, resume_path, cfg, model)
    if accelerator.is_main_process:  # only once config, data, model and checkpoint are known to be valid
        remove_stale_temporaries(out)
        out.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(text))
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = build_ema(cfg, accelerator.unwrap_model(model))  # a copy on the training device
    rng.seed_everything(t.seed + rank)  # mixup/cutmix and dropout differ per process (drop-path is seeded per sample)

    progress = Progress()
    if state is not None:
        progress = _restore(state, cfg, accelerator, model, optimizer, scheduler, ema)
        _say(accelerator, f"resumed from {resume_path} at epoch {progress.epoch}, step {progress.global_step}")
    log = MetricsLog(out / "metrics.jsonl")
    if accelerator.is_main_process:
        log.truncate(progress.epoch)  # a fresh run starts an empty log; a resumed one drops redone epochs
    val_sampler = EpochSampler(len(splits.val), cfg.data.eval_batch_size or 2 * bs, rank=rank, num_replicas=world,
                               shuffle=False)
    val_loader = build_loader(splits.val, val_sampler, val_sampler.batch_size, cfg.data.num_workers, t.seed,
                              pin_memory=accelerator.device.type == "cuda", train=False)
    _say(accelerator, f"{cfg.model['name']}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
         f"{len(splits.train)} train / {len(splits.val)} val images, {num_classes} classes, {world} process(es), "
         f"{steps_per_epoch} steps/epoch, lr {lr:.3g}")

    record: Dict[str, Any] = {}
    while progress.epoch < t.epochs:
        start = time.perf_counter()
        stopped = _train_epoch(cfg, accelerator, model, optimizer, scheduler, ema, mixup, criterion, splits.train,
                               sampler, steps_per_epoch, progress, out)
        if stopped:
            return {}
        record = _end_epoch(cfg, accelerator, model, ema, val_loader, progress, log, out,
                            lr=scheduler.get_last_lr()[0], epoch_time=time.perf_counter() - start)
        _save(accelerator, cfg, out, model, optimizer, scheduler, ema, progress)
    if accelerator.is_main_process:
        meta = {"model": cfg.model["name"], "config": json.dumps(cfg.model)}
        export_safetensors(accelerator.unwrap_model(model).state_dict(), out / "model.safetensors", meta)
        if ema is not None:
            export_safetensors(ema.module.state_dict(), out / "model_ema.safetensors", meta)
    accelerator.wait_for_everyone()
    return record or (log.read()[-1] if accelerator.is_main_process and log.read() else {})


_say = functools.partial(say, job="classify")  # _say(accelerator, message)


def _train_epoch(cfg: Config, accelerator: Accelerator, model: nn.Module, optimizer, scheduler, ema, mixup,
                 criterion: nn.Module, dataset, sampler: EpochSampler, steps_per_epoch: int, progress: Progress,
                 out: Path, compute_loss: Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]] = None) -> bool:
    """One epoch (or its rest, after a resume) of optimizer steps; True when ``train.max_steps`` stopped it.

    ``compute_loss(model, x, target)`` replaces ``criterion(model(x), target)`` (``linvision linearize``'s stages).
    Drop-path decides each sample from ``(seed, epoch, dataset index)`` (forward and backward, so also under
    activation checkpointing), so a sample's masks do not depend on how the global batch is split.
    """
    t = cfg.train
    sampler.set_epoch(progress.epoch, start_batch=progress.step_in_epoch * t.accum_steps)
    loader = build_loader(dataset, sampler, cfg.data.batch_size, cfg.data.num_workers, t.seed + progress.epoch,
                          pin_memory=accelerator.device.type == "cuda")
    model.train()
    device = accelerator.device
    loss_sum = torch.tensor(progress.loss_sum, dtype=torch.float64, device=device)
    bar = tqdm(total=steps_per_epoch, initial=progress.step_in_epoch, desc=f"epoch {progress.epoch + 1}/{t.epochs}",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True, leave=False)
    start, images = time.perf_counter(), 0
    for x, y, index in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        target = y
        if mixup is not None:
            x, target = mixup(x, y)
        keys = [(t.seed, progress.epoch, i) for i in index.tolist()]
        with accelerator.accumulate(model), per_sample_drop_path(accelerator.unwrap_model(model), keys):
            with accelerator.autocast():
                loss = compute_loss(model, x, target) if compute_loss else criterion(model(x), target)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.optim.clip_grad is not None:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().double() * x.shape[0]
        progress.samples += x.shape[0]
        images += x.shape[0]
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        progress.step_in_epoch += 1
        progress.global_step += 1
        if ema is not None:
            ema.update(accelerator.unwrap_model(model), step=progress.global_step)
        bar.update(1)
        if progress.step_in_epoch % t.log_every == 0 or progress.step_in_epoch == steps_per_epoch:
            rate = images * accelerator.num_processes / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", img_s=f"{rate:.0f}")
        every = t.checkpoint_every_steps
        stop = t.max_steps is not None and progress.global_step >= t.max_steps
        if stop or (every and progress.global_step % every == 0 and progress.step_in_epoch < steps_per_epoch):
            progress.loss_sum = float(loss_sum)
            _save(accelerator, cfg, out, model, optimizer, scheduler, ema, progress)
        if stop:
            bar.close()
            _say(accelerator, f"stopped at train.max_steps={t.max_steps} (checkpoint saved)")
            return True
    bar.close()
    progress.loss_sum = float(loss_sum)
    progress.images_per_s = images * accelerator.num_processes / max(time.perf_counter() - start, 1e-9)
    return False


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator: Accelerator) -> Dict[str, float]:
    """Cross-entropy, top-1 and top-5 (percent) over the whole validation set (all processes)."""
    model.eval()
    device = accelerator.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, samples
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with accelerator.autocast():
            logits = model(x)
        logits = logits.float()
        loss = nn.functional.cross_entropy(logits, y, reduction="sum").double()
        hits = topk_correct(logits, y, (1, 5)).double()
        sums += torch.cat([loss[None], hits, torch.tensor([len(y)], dtype=torch.float64, device=device)])
    sums = accelerator.reduce(sums, reduction="sum")
    n = max(float(sums[3]), 1.0)
    return {"loss": float(sums[0]) / n, "top1": 100.0 * float(sums[1]) / n, "top5": 100.0 * float(sums[2]) / n}


def _end_epoch(cfg: Config, accelerator: Accelerator, model: nn.Module, ema, val_loader, progress: Progress,
               log: MetricsLog, out: Path, lr: float, epoch_time: float) -> Dict[str, Any]:
    """Evaluate model and EMA, log the epoch (metrics.jsonl, plot) and reset the epoch counters."""
    sums = accelerator.reduce(torch.tensor([progress.loss_sum, progress.samples], dtype=torch.float64,
                                           device=accelerator.device), reduction="sum")
    record: Dict[str, Any] = {"epoch": progress.epoch + 1, "step": progress.global_step,
                              "lr": float(lr),
                              "train_loss": float(sums[0]) / max(float(sums[1]), 1.0)}
    start = time.perf_counter()
    # the unwrapped module: evaluation shards are uneven, and a DDP forward could wait on other processes
    metrics = evaluate(accelerator.unwrap_model(model), val_loader, accelerator)
    record.update({f"val_{k}": v for k, v in metrics.items()})
    if ema is not None:
        record.update({f"ema_val_{k}": v for k, v in evaluate(ema.module, val_loader, accelerator).items()})
    record["eval_time_s"] = time.perf_counter() - start
    record["epoch_time_s"] = epoch_time
    record["images_per_s"] = progress.images_per_s
    progress.epoch += 1
    progress.step_in_epoch, progress.loss_sum, progress.samples = 0, 0.0, 0
    if accelerator.is_main_process:
        log.append(record)
        plot_metrics(log.read(), out / "metrics.png")
        ema_part = f", EMA top-1 {record['ema_val_top1']:.2f}" if ema is not None else ""
        tqdm.write(f"[classify] epoch {record['epoch']}/{cfg.train.epochs}: train loss {record['train_loss']:.4f}, "
                   f"val loss {record['val_loss']:.4f}, top-1 {record['val_top1']:.2f}, "
                   f"top-5 {record['val_top5']:.2f}{ema_part}")
    return record


# --- checkpoints ------------------------------------------------------------------------------------------


def _check_resumable(state: Dict[str, Any], path: Path, cfg: Config, model: nn.Module,
                     kind: str = "classification") -> None:
    """ConfigError unless ``state`` (a loaded checkpoint) fits this run's model and EMA setting (a config
    without an ``ema`` section, as linearize's, has none); ``kind`` names the job's checkpoints."""
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "processes",
                           "config") if k not in state]
    if missing:
        raise ConfigError(f"train.resume: {path} is not a {kind} checkpoint (it lacks {', '.join(missing)})")
    own, saved = model.state_dict(), state["model"]
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ConfigError(f"train.resume: {path} is not a {kind} checkpoint (its model is not a state dict)")
    wrong = sorted(k for k in set(own) | set(saved) if k not in own or k not in saved or own[k].shape != saved[k].shape)
    if wrong:
        raise ConfigError(f"train.resume: {path} holds another model ({len(wrong)} weights differ in name or shape, "
                          f"e.g. {', '.join(wrong[:3])})")
    if getattr(cfg, "ema", None) is not None and cfg.ema.enabled and state.get("ema") is None:
        raise ConfigError(f"train.resume: ema.enabled is true but {path} has no EMA weights")


def _save(accelerator: Accelerator, cfg: Config, out: Path, model: nn.Module, optimizer, scheduler, ema,
          progress: Progress) -> None:
    """Checkpoint the run (collective: every process contributes its RNG state and running loss)."""
    local = {"rng": rng.capture(), "loss_sum": float(progress.loss_sum), "samples": int(progress.samples)}
    processes = gather_object([local])
    if accelerator.is_main_process:
        state = {
            "model": accelerator.unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler_state(accelerator),
            "ema": ema.module.state_dict() if ema is not None else None,
            "ema_rng": ema._sr_generator.get_state() if ema is not None else None,
            "epoch": progress.epoch,
            "step_in_epoch": progress.step_in_epoch,
            "global_step": progress.global_step,
            "processes": processes,
            "sampler": {"seed": cfg.train.seed, "epoch": progress.epoch,
                        "start_batch": progress.step_in_epoch * cfg.train.accum_steps},
            "config": cfg.to_dict(),
        }
        save_checkpoint(state, out / CHECKPOINT)
    accelerator.wait_for_everyone()


def _restore(state: Dict[str, Any], cfg: Config, accelerator: Accelerator, model: nn.Module, optimizer, scheduler,
             ema) -> Progress:
    """Load a checkpoint into the prepared objects and this process's RNG; returns where to continue."""
    warning = config_change_warning(state["config"], cfg.to_dict(), RESUME_FREE)
    if warning:
        _say(accelerator, warning)
    accelerator.unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    load_scaler_state(accelerator, state.get("scaler"))
    if ema is not None:
        ema.module.load_state_dict(state["ema"])
        ema._sr_generator.set_state(state["ema_rng"])
    processes = state["processes"]
    rank = accelerator.process_index
    if len(processes) == accelerator.num_processes:
        mine = processes[rank]
        rng.restore(mine["rng"])
        loss_sum, samples = mine["loss_sum"], mine["samples"]
    else:
        _say(accelerator, f"warning: checkpoint from {len(processes)} process(es), running {accelerator.num_processes}: "
             "random streams are reseeded, so the run will not match an uninterrupted one")
        rng.seed_everything(cfg.train.seed + rank + 1000 * state["global_step"])
        loss_sum, samples = 0.0, 0
    return Progress(epoch=state["epoch"], step_in_epoch=state["step_in_epoch"], global_step=state["global_step"],
                    loss_sum=loss_sum, samples=samples)


JOB = ConfigJob("classify", __doc__, "configs/classify/digits_linear.yaml",
                "train.epochs=3 model.mixer=lit optim.lr=1e-3", describe, load_config, run)
add_arguments, main, cli = JOB.add_arguments, JOB.main, JOB.cli  # for linvision.cli and python -m


if __name__ == "__main__":
    sys.exit(cli())
