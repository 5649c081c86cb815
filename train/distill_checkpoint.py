"""The distillation job's checkpoint: the trainable student weights, optimizer, scheduler, loss scaler, step,
every process's RNG state and loss window, and the config (``checkpoint.pt`` in the run directory).

Saved atomically and loaded with ``weights_only=True`` (:mod:`linvision.train.checkpoint`); which checkpoint
to resume and the config-change warning are :mod:`linvision.train.resume`'s, shared with classify.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict

import torch
from accelerate.utils import gather_object

from . import rng
from .checkpoint import save_checkpoint
from .config import ConfigError
from .resume import CHECKPOINT, config_change_warning, load_scaler_state, scaler_state

if TYPE_CHECKING:
    from .distill import Job

# keys that may differ between a run and its resumption without changing its results
RESUME_FREE = frozenset({"train.resume", "train.max_steps", "train.checkpoint_every", "train.log_every",
                         "train.threads", "data.num_workers", "eval"})


def save(job: "Job") -> None:
    """Checkpoint (collective: every process contributes its RNG state)."""
    acc = job.accelerator
    processes = gather_object([{"rng": rng.capture(), "window": job.window.clone(), "window_count": job.window_count}])
    if acc.is_main_process:
        student = acc.unwrap_model(job.student)
        wanted = set(job.pair.trainable)
        state = {
            "trainable": {n: p.detach().cpu().clone() for n, p in student.named_parameters() if n in wanted},
            "optimizer": job.optimizer.state_dict(),
            "scheduler": job.scheduler.state_dict(),
            "scaler": scaler_state(acc),
            "global_step": job.global_step,
            "processes": processes,
            "config": job.cfg.to_dict(),
        }
        save_checkpoint(state, job.out / CHECKPOINT)
    acc.wait_for_everyone()


def restore(job: "Job", state: Dict[str, Any], say: Callable[[str], None]) -> int:
    """Load a checkpoint into the prepared objects and this process's RNG; returns the step to continue at.
    ``say`` prints the warnings (a changed config, another process count)."""
    acc = job.accelerator
    warning = config_change_warning(state["config"], job.cfg.to_dict(), RESUME_FREE)
    if warning:
        say(warning)
    student = acc.unwrap_model(job.student)
    params = dict(student.named_parameters())
    missing = sorted(set(job.pair.trainable) - set(state["trainable"]))
    if missing:
        raise ConfigError(f"the checkpoint lacks trainable parameters {missing[:3]} (different student settings?)")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    job.optimizer.load_state_dict(state["optimizer"])
    job.scheduler.load_state_dict(state["scheduler"])
    load_scaler_state(acc, state.get("scaler"))
    processes = state["processes"]
    if len(processes) == acc.num_processes:
        mine = processes[acc.process_index]
        rng.restore(mine["rng"])
        job.window, job.window_count = mine["window"].clone(), int(mine["window_count"])
    else:
        say(f"warning: checkpoint from {len(processes)} process(es), running {acc.num_processes}: data shards "
            "and noise differ from an uninterrupted run")
    return int(state["global_step"])


__all__ = ["RESUME_FREE", "restore", "save"]
