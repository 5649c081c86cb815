"""Resuming a training job (classify, linearize, distill): which checkpoint, what changed in the config since,
and the loss scaler's state. The files themselves are :mod:`linvision.train.checkpoint`'s."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Collection, Dict, Mapping, Optional

from .config import ConfigError

CHECKPOINT = "checkpoint.pt"


def checkpoint_to_resume(resume: Optional[str], out: Path) -> Optional[Path]:
    """The checkpoint for ``train.resume``: None (fresh), ``out/checkpoint.pt`` for ``'auto'`` if it exists,
    or the given path (``ConfigError`` when it is not a file)."""
    if resume is None:
        return None
    if resume == "auto":
        path = out / CHECKPOINT
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"train.resume: no checkpoint at {path}")
    return path


def flatten_config(tree: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """``{section: {key: value}}`` → ``{"section.key": value}`` (values that are mappings stay whole)."""
    return {f"{s}.{k}": v for s, section in tree.items() for k, v in section.items()}


def config_change_warning(old: Mapping[str, Any], new: Mapping[str, Any], free: Collection[str]) -> Optional[str]:
    """The warning for a resumed run whose config ``new`` differs from its checkpoint's ``old`` (both as
    ``to_dict()`` trees) in keys other than ``free`` (``section.key`` names or whole sections, which may change
    without changing the results); None when nothing else changed."""
    old, new = flatten_config(old), flatten_config(new)
    changed = sorted(k for k in set(old) | set(new)
                     if old.get(k) != new.get(k) and k not in free and k.split(".")[0] not in free)
    if not changed:
        return None
    return ("warning: config differs from the checkpoint's in "
            + ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed)
            + "; the run will not match an uninterrupted one")


def scaler_state(accelerator) -> Optional[Dict[str, Any]]:
    """The mixed-precision loss scaler's state (None without one)."""
    scaler = getattr(accelerator, "scaler", None)
    return scaler.state_dict() if scaler is not None else None


def load_scaler_state(accelerator, state: Optional[Dict[str, Any]]) -> None:
    """Restore :func:`scaler_state` where this run has a scaler and the checkpoint a state."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state is not None:
        scaler.load_state_dict(state)


__all__ = ["CHECKPOINT", "checkpoint_to_resume", "config_change_warning", "flatten_config", "load_scaler_state",
           "scaler_state"]
