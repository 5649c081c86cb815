"""Distill a softmax diffusion denoiser into a linear-attention adapter (LinFusion, CLEAR, LiT, ... recipes).

Loads a diffusers pipeline (the teacher), installs an adapter for ``student.mechanism`` into its denoiser
(the student; the teacher is a frozen copy taken first), and trains the chosen parameters with the papers'
loss: task loss (ε, v or flow-matching target, from the scheduler) + output matching + per-layer
attention-output matching (+ LiT's variance term), each weighted by ``loss.*``. An accelerate loop:
mixed precision, gradient accumulation, clipping, several processes (``accelerate launch``), gradient
checkpointing; AdamW or Prodigy.

Writes to ``train.output_dir``: ``config.yaml``; ``checkpoint.pt`` (atomic: trainable weights, optimizer,
schedule, RNG; ``--resume`` continues at the same step with the same data, noise and timesteps);
``metrics.jsonl`` (every loss term every ``log_every`` steps) and ``losses.png``; ``eval.jsonl`` and
``samples/step_*.png`` (teacher row over student row, same seeds; ``sample_mse`` = per-pixel MSE); at the
end ``adapter/`` (``save_pretrained``), ``pipeline/`` when parameters outside the adapter trained,
``sample.yaml`` for ``linvision sample`` and ``result.json``.

Examples:
  linvision distill --config configs/distill/tiny_dit_digits.yaml                  # CPU, minutes
  linvision distill --config configs/distill/sd15_linfusion.yaml data.root=/data/laion --resume
  accelerate launch --multi_gpu --num_processes 8 -m linvision.train.distill \\
      --config configs/distill/flux_clear_r16.yaml data.cache_dir=/data/cache
"""
from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm

from linvision.diffusers.files import LOAD_ERRORS
from linvision.distill import DistillPair, LossWeights, Objective, conditioner_for
from linvision.distill.conditioning import to as cond_to
from linvision.distill.transfer import transfer_mixers
from linvision.dtypes import MIXED_PRECISION_DTYPES

from . import rng
from .checkpoint import atomic_folder, atomic_write, load_checkpoint, remove_stale_temporaries
from .config import ConfigError
from .data import EpochSampler
from .distill_checkpoint import restore, save
from .distill_config import DistillConfig, describe, load_distill_config
from .distill_data import (Conditions, LatentDataset, PixelDataset, encode_all, encode_pixels, encode_texts,
                           fingerprint, list_records, read_cache, split_text_cache, write_cache)
from .distill_sampling import SampleComparer, draw
from .job_cli import ConfigJob, say
from .metrics import MetricsLog, plot_series
from .resume import checkpoint_to_resume
from .schedule import build_scheduler

TERMS = ("loss", "task", "output", "feature", "variance", "attention")


# --- the job ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """Everything the loop needs, built once."""

    cfg: DistillConfig
    accelerator: Accelerator
    pipe: Any
    pair: DistillPair
    student: Any  # the prepared (possibly DDP-wrapped) student
    optimizer: Any
    scheduler: Any
    objective: Objective
    conditioner: Any
    conditions: Conditions
    dataset: Any
    weights: LossWeights
    out: Path
    comparer: Optional[SampleComparer] = None
    global_step: int = 0
    window: Optional[torch.Tensor] = None  # this process's sums of the loss terms since the last log line
    window_count: int = 0  # micro-batches in the window

    def reset_window(self) -> None:
        self.window, self.window_count = torch.zeros(len(TERMS), dtype=torch.float64), 0


def run(cfg: DistillConfig) -> Dict[str, Any]:
    """Distill as configured; returns the result summary (empty if ``train.max_steps`` stopped it early)."""
    with rng.cpu_threads(cfg.train.threads):
        return _run(cfg)


_say = functools.partial(say, job="distill")  # _say(accelerator, message)


def _run(cfg: DistillConfig) -> Dict[str, Any]:
    start = time.perf_counter()
    resume_path = checkpoint_to_resume(cfg.train.resume, Path(cfg.train.output_dir))
    state = load_checkpoint(resume_path) if resume_path is not None else None  # before anything is written
    job = build(cfg)
    acc = job.accelerator
    if state is not None:
        job.global_step = restore(job, state, lambda message: _say(acc, message))
        _say(acc, f"resumed from {resume_path} at step {job.global_step}")
    log, evals = MetricsLog(job.out / "metrics.jsonl"), MetricsLog(job.out / "eval.jsonl")
    if acc.is_main_process:  # a fresh run starts empty logs; a resumed one drops the steps it will redo
        log.truncate(job.global_step, key="step")
        evals.truncate(job.global_step, key="step")
    if job.global_step == 0:
        _evaluate(job, evals)
    stopped = train_loop(job, log, evals)
    if stopped:
        return {}
    _evaluate(job, evals)  # at the end (periodic evaluations skip the last step)
    result = _finish(job, log, evals, time.perf_counter() - start)
    acc.wait_for_everyone()
    return result


def build(cfg: DistillConfig) -> Job:
    """Accelerator, pipeline, data (cached if asked), teacher/student pair, optimizer; nothing trained yet."""
    from linvision.sample.pipeline import load_pipeline

    t, d = cfg.train, cfg.data
    acc = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.accum_steps, cpu=t.cpu,
                      step_scheduler_with_optimizer=False)
    rng.seed_everything(t.seed)
    out = Path(t.output_dir)
    try:
        pipe = load_pipeline(cfg.pipeline.model, "float32", str(acc.device))
    except LOAD_ERRORS as err:
        raise ConfigError(f"pipeline.model: {err}") from None
    if cfg.pipeline.scheduler_overrides:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **cfg.pipeline.scheduler_overrides)
    conditioner = conditioner_for(pipe, d.max_sequence_length)
    objective = Objective(pipe.scheduler)
    _check_against_pipeline(cfg, pipe, conditioner)
    records = list_records(d, t.seed)
    dataset, conditions = _prepare_data(cfg, acc, pipe, conditioner, records, out)
    rng.seed_everything(t.seed)  # identical adapter initialisation on every process
    s = cfg.student
    try:
        adapter = None
        if s.adapter is not None:
            from linvision.diffusers.students import load_student

            adapter = load_student(pipe, s.adapter)
            if adapter.config.mechanism != s.mechanism:
                raise ValueError(f"student.adapter is a {adapter.config.mechanism!r} adapter, not {s.mechanism!r}")
        pair = DistillPair.build(pipe, s.mechanism, s.options, s.inherit, s.trainable, s.feature_layers, adapter=adapter)
    except (OSError, ValueError) as err:
        raise ConfigError(f"student: {err}") from None
    weights = LossWeights(cfg.loss.task, cfg.loss.output, cfg.loss.feature, cfg.loss.variance, cfg.loss.attention)
    _check_loss(weights, pair, pipe)
    if s.gradient_checkpointing:
        if not getattr(pair.student, "_supports_gradient_checkpointing", False):
            raise ConfigError(f"student.gradient_checkpointing: {type(pair.student).__name__} does not support it")
        pair.student.enable_gradient_checkpointing()
    # Teacher and student must see identical inputs: both run in eval mode (no dropout, no built-in label
    # dropout); conditioning dropout is the job's own (data.cond_dropout), the same for both.
    pair.student.eval()
    weight_dtype = MIXED_PRECISION_DTYPES.get(acc.mixed_precision, torch.float32)
    pair.teacher.to(acc.device)
    if weight_dtype != torch.float32:
        pair.teacher.to(dtype=weight_dtype)
        from diffusers.training_utils import cast_training_params

        pair.student.to(dtype=weight_dtype)
        cast_training_params(pair.student, dtype=torch.float32)
    optimizer = _optimizer(cfg, pair.trainable_parameters())
    o = cfg.optim
    scheduler = build_scheduler(optimizer, t.steps, o.warmup_steps, o.lr, 0.0,
                                o.lr if o.schedule == "constant" else o.min_lr)
    student, optimizer = acc.prepare(pair.student, optimizer)
    if acc.is_main_process:
        remove_stale_temporaries(out)
        out.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(text))
    n_train = sum(p.numel() for p in pair.trainable_parameters())
    _say(acc, f"{type(pair.student).__name__} + {s.mechanism}: {len(pair.adapter.config.modules_list)} attentions "
         f"replaced, {n_train / 1e6:.3f}M trainable params, {len(pair.layers)} feature layers; {len(dataset)} "
         f"examples; objective {objective.kind}; {acc.num_processes} process(es)")
    job = Job(cfg, acc, pipe, pair, student, optimizer, scheduler, objective, conditioner, conditions, dataset,
              weights, out)
    job.reset_window()
    if cfg.eval.enabled:
        job.comparer = _comparer(job)
    return job


def _check_against_pipeline(cfg: DistillConfig, pipe, conditioner) -> None:
    """The config keys that depend on the teacher: resolutions (latent stride), class ids (class count)."""
    from linvision.sample.pipeline import check_class_labels, check_size

    d, e = cfg.data, cfg.eval
    for key, size in (("data.resolution", d.resolution), ("eval.resolution", e.resolution)):
        if size is not None:
            try:
                check_size(pipe, size, size)
            except ValueError as err:
                raise ConfigError(f"{key}={size}: {err}") from None
    labelled = (("data.class_labels", d.class_labels), ("eval.class_labels", e.class_labels),
                ("data.class_ids", sorted(d.class_ids.values())))
    for key, labels in labelled:
        if labels and conditioner.text:
            raise ConfigError(f"{key}: {type(pipe).__name__} is text-conditional; give prompts, not class labels")
        try:
            check_class_labels(pipe, labels, key)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _check_loss(weights: LossWeights, pair: DistillPair, pipe) -> None:
    if weights.feature and not pair.layers:
        raise ConfigError("loss.feature > 0 but student.feature_layers is empty")
    if weights.attention and not transfer_mixers(pair.student):
        raise ConfigError(f"loss.attention > 0 needs a mixer with attention weights (hedgehog, lolcats, liger), "
                          f"not {pair.adapter.config.mechanism!r}")
    if weights.variance:
        config = pair.teacher.config
        out_channels = getattr(config, "out_channels", None) or getattr(pair.teacher, "out_channels", None) \
            or config.in_channels
        if out_channels != 2 * config.in_channels:
            raise ConfigError(f"loss.variance > 0 needs a learned-sigma denoiser (out_channels = 2 x in_channels); "
                              f"{type(pair.teacher).__name__} has {out_channels} for {config.in_channels}")


def _optimizer(cfg: DistillConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("optim.name=prodigy needs the prodigyopt package (pip install prodigyopt)") from None
        return Prodigy(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps, decouple=True,
                       use_bias_correction=o.prodigy_bias_correction, safeguard_warmup=o.prodigy_safeguard_warmup)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


# --- data ---------------------------------------------------------------------------------------------------


def _prepare_data(cfg: DistillConfig, acc: Accelerator, pipe, conditioner, records, out: Path):
    """``(dataset, conditions)``: pixels encoded each step, or latents (and text) cached by the main process."""
    d = cfg.data
    folder = Path(d.cache_dir) if d.cache_dir else (out / "cache" if d.source == "teacher" else None)
    if folder is None:
        return PixelDataset(records, d, cfg.train.seed), Conditions(records, conditioner)
    stamp = fingerprint(cfg.pipeline.model, d, records)
    if acc.is_main_process and read_cache(folder, stamp) is None:
        cache_text = conditioner.text and d.cache_text and conditioner.has_text_encoder()
        text = encode_texts(conditioner, records) if cache_text else {}
        with tqdm(total=len(records), desc="caching latents", disable=not acc.is_local_main_process) as bar:
            if d.source == "teacher":
                latents = _teacher_latents(cfg, pipe, conditioner, records, text, bar)
            else:
                latents = encode_all(pipe, records, d, progress=bar)
        write_cache(folder, stamp, latents, text)
    acc.wait_for_everyone()
    cache = read_cache(folder, stamp)
    cond, null = split_text_cache(cache["text"])
    latents = cache["latents"]
    return LatentDataset(latents["mean"], latents.get("std")), Conditions(records, conditioner, cond, null)


def _teacher_latents(cfg: DistillConfig, pipe, conditioner, records, text, bar, batch: int = 8) -> Dict[str, torch.Tensor]:
    """The teacher's own samples (model-space latents) for every record's condition and seed."""
    d = cfg.data
    conditions = Conditions(records, conditioner, *split_text_cache(text))
    null = conditions.null() if conditioner.text and d.teacher_guidance > 1 else None
    chunks = []
    for i in range(0, len(records), batch):
        rows = list(range(i, min(i + batch, len(records))))
        cond = conditions.batch(rows, pipe.device)
        chunks.append(draw(pipe, conditioner, cond, null, [records[r].seed for r in rows], d.resolution,
                           d.teacher_steps, d.teacher_guidance, output_type="latent").float().cpu())
        bar.update(len(rows))
    return {"mean": torch.cat(chunks)}


def _comparer(job: Job) -> SampleComparer:
    e, d = job.cfg.eval, job.cfg.data
    c = job.conditioner
    if c.text:
        if e.prompts:
            cond = c.encode_prompts(e.prompts)
        else:
            k = min(e.num_conditions, len(job.dataset))
            cond = job.conditions.batch(range(k))
        null = job.conditions.null() if e.guidance > 1 else None
    else:
        labels = e.class_labels or list(dict.fromkeys(job.conditions.labels))[: e.num_conditions]
        cond, null = c.labels(labels), None
    cond = cond_to(cond, job.accelerator.device)
    return SampleComparer(job.pipe, c, job.pair.teacher, cond, null, e.seeds, e.resolution or d.resolution, e.steps,
                          e.guidance, job.out / "samples")


def _evaluate(job: Job, evals: MetricsLog) -> None:
    """Teacher-vs-student samples on the main process (the others wait)."""
    acc = job.accelerator
    if job.comparer is not None and acc.is_main_process:
        job.pair.set_capture(False)
        try:
            with acc.autocast():
                record = job.comparer.compare(job.global_step)
        finally:
            job.pair.set_capture(True)
        evals.append(record)
        _say(acc, f"step {job.global_step}: teacher-vs-student sample MSE {record['sample_mse']:.5f} ({record['grid']})")
    acc.wait_for_everyone()


# --- the loop -----------------------------------------------------------------------------------------------


def _micro_batch(job: Job, batch: Dict[str, torch.Tensor], generator: torch.Generator):
    """Clean latents, noise, schedule indices and conditions of one micro-batch (all randomness from ``generator``)."""
    d, device = job.cfg.data, job.accelerator.device
    if "pixels" in batch:
        mean, std = encode_pixels(job.pipe.vae, batch["pixels"])
    else:
        mean, std = batch["mean"], batch.get("std")
    mean = mean.float().cpu()
    x0 = mean
    if std is not None and d.sample_posterior:
        x0 = mean + std.float().cpu() * torch.randn(mean.shape, generator=generator)
    B = x0.shape[0]
    drop = torch.rand(B, generator=generator) < d.cond_dropout if d.cond_dropout > 0 else None
    noise = torch.randn(x0.shape, generator=generator)
    index = job.objective.sample_indices(B, generator)
    cond = job.conditions.batch(batch["index"].tolist(), device, drop)
    return x0.to(device), noise.to(device), index.to(device), cond


def train_loop(job: Job, log: MetricsLog, evals: MetricsLog) -> bool:
    """Optimizer steps up to ``train.steps``; True when ``train.max_steps`` stopped the run."""
    cfg, acc = job.cfg, job.accelerator
    t, d = cfg.train, cfg.data
    world, rank = acc.num_processes, acc.process_index
    sampler = EpochSampler(len(job.dataset), d.batch_size, t.seed, rank, world, shuffle=True, multiple_of=t.accum_steps)
    steps_per_epoch = sampler.num_batches() // t.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(job.dataset)} examples are too few for batch_size {d.batch_size} x {world} processes "
                          f"x accum_steps {t.accum_steps}")
    bar = tqdm(total=t.steps, initial=job.global_step, desc="distill", disable=not acc.is_local_main_process,
               dynamic_ncols=True)
    params = job.pair.trainable_parameters(acc.unwrap_model(job.student))
    window_start, window_steps = time.perf_counter(), 0
    try:
        while job.global_step < t.steps:
            epoch, done = divmod(job.global_step, steps_per_epoch)
            sampler.set_epoch(epoch, start_batch=done * t.accum_steps)
            loader = torch.utils.data.DataLoader(job.dataset, batch_size=d.batch_size, sampler=sampler,
                                                 num_workers=d.num_workers, drop_last=False)
            micro = 0
            for batch in loader:
                seed = rng.sample_seed(t.seed, job.global_step * t.accum_steps + micro, rank)
                x0, noise, index, cond = _micro_batch(job, batch, torch.Generator().manual_seed(seed))
                with acc.accumulate(job.student):
                    with acc.autocast():
                        terms = job.pair.losses(x0, noise, index, cond, job.objective, job.conditioner, job.weights,
                                                student=job.student)
                    acc.backward(terms["loss"])
                    if acc.sync_gradients and cfg.optim.clip_grad is not None:
                        acc.clip_grad_norm_(params, cfg.optim.clip_grad)
                    job.optimizer.step()
                    job.optimizer.zero_grad(set_to_none=True)
                job.pair.clear()
                job.window += torch.tensor([float(terms[k].detach()) if k in terms else float("nan") for k in TERMS],
                                           dtype=torch.float64)
                job.window_count += 1
                micro += 1
                if not acc.sync_gradients:
                    continue
                job.scheduler.step()
                job.global_step += 1
                bar.update(1)
                micro, window_steps = 0, window_steps + 1
                if job.global_step % t.log_every == 0 or job.global_step == t.steps:
                    _log(job, log, (time.perf_counter() - window_start) / window_steps, bar)
                    window_start, window_steps = time.perf_counter(), 0
                stop = t.max_steps is not None and job.global_step >= t.max_steps
                every = t.checkpoint_every
                if stop or job.global_step == t.steps or (every and job.global_step % every == 0):
                    save(job)
                if cfg.eval.every and job.global_step % cfg.eval.every == 0 and job.global_step < t.steps:
                    _evaluate(job, evals)
                if stop and job.global_step < t.steps:
                    _say(acc, f"stopped at train.max_steps={t.max_steps} (checkpoint saved)")
                    return True
                if job.global_step >= t.steps:
                    break
    finally:
        bar.close()
    return False


def _log(job: Job, log: MetricsLog, step_time: float, bar) -> None:
    """Loss terms averaged over the steps since the last line (all micro-batches and processes), to
    metrics.jsonl and the plot."""
    acc = job.accelerator
    values = job.window / max(job.window_count, 1)
    job.reset_window()
    values = acc.reduce(values.to(acc.device), reduction="mean").cpu()
    if not acc.is_main_process:
        return
    record = {"step": job.global_step, "lr": float(job.scheduler.get_last_lr()[0]), "step_time_s": step_time}
    record.update({k: float(v) for k, v in zip(TERMS, values) if v == v})
    log.append(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}")
    _plot(job, log)


def _plot(job: Job, log: MetricsLog) -> None:
    evals = MetricsLog(job.out / "eval.jsonl").read()
    panels = [("distillation loss terms", log.read(), TERMS)]
    if evals:
        panels.append(("teacher-vs-student sample MSE", evals, ("sample_mse",)))
    plot_series(panels, job.out / "losses.png")


# --- the end ------------------------------------------------------------------------------


def _finish(job: Job, log: MetricsLog, evals: MetricsLog, wall: float) -> Dict[str, Any]:
    """Export the adapter (and the changed pipeline), a ``linvision sample`` config and the summary."""
    acc, cfg = job.accelerator, job.cfg
    if not acc.is_main_process:
        return {}
    adapter = job.pair.adapter
    atomic_folder(job.out / "adapter", lambda tmp: adapter.save_pretrained(str(tmp)))
    model = cfg.pipeline.model
    if job.pair.trains_outside_adapter():  # e.g. LiT's '*': the base denoiser changed too
        adapter.uninstall()
        try:
            atomic_folder(job.out / "pipeline", lambda tmp: job.pipe.save_pretrained(str(tmp)))
        finally:
            adapter.install(job.pipe)
        model = str(job.out / "pipeline")
    e, d = cfg.eval, cfg.data
    sampling: Dict[str, Any] = {"seeds": list(e.seeds), "height": e.resolution or d.resolution,
                                "width": e.resolution or d.resolution, "steps": e.steps, "guidance": e.guidance}
    if job.conditioner.text:
        sampling["prompts"] = list(e.prompts or [t for t in job.conditions.texts[: e.num_conditions]])
    else:
        sampling["class_labels"] = list(e.class_labels or list(dict.fromkeys(job.conditions.labels))[: e.num_conditions])
    sample_cfg = {"pipeline": {"model": model, "adapter": str(job.out / "adapter"), "device": "cpu"},
                  "sampling": sampling, "output": {"dir": str(job.out / "final_samples")}}
    atomic_write(job.out / "sample.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(sample_cfg, sort_keys=False)))
    records, ev = log.read(), evals.read()
    _plot(job, log)
    result = {"steps": job.global_step, "wall_s": round(wall, 2), "adapter": str(job.out / "adapter"),
              "losses_png": str(job.out / "losses.png")}
    if records:
        result["first"] = {k: records[0][k] for k in TERMS if k in records[0]}
        result["last"] = {k: records[-1][k] for k in TERMS if k in records[-1]}
    if ev:
        result["sample_mse_start"] = ev[0]["sample_mse"] if ev[0]["step"] == 0 else None
        result["sample_mse_end"] = ev[-1]["sample_mse"]
        result["grid_end"] = ev[-1].get("grid")
    atomic_write(job.out / "result.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    _say(acc, f"done: {job.global_step} steps in {wall:.1f} s; adapter in {job.out / 'adapter'}")
    return result


JOB = ConfigJob("distill", __doc__, "configs/distill/tiny_dit_digits.yaml", "train.steps=100 student.mechanism=lit",
                describe, load_distill_config, run)
add_arguments, main, cli = JOB.add_arguments, JOB.main, JOB.cli  # for linvision.cli and python -m


if __name__ == "__main__":
    sys.exit(cli())
