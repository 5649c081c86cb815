"""Atomic files: training checkpoints (``torch.save``, loaded with ``weights_only=True``) and safetensors exports.

Every write goes to a temporary file in the destination's directory, is flushed and ``fsync``-ed, then
``os.replace``-d over the destination (atomic on POSIX and Windows), and the directory entry is synced.
A crash or exception mid-write leaves the previous file intact and removes the temporary file; a killed
process leaves it behind, and :func:`remove_stale_temporaries` deletes such files when the next run starts.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (so ``torch.load(...,
weights_only=True)`` reads it without running pickled code):

``format`` (int), ``model``/``ema`` (state dicts), ``optimizer``, ``scheduler``, ``scaler`` (or None),
``ema_rng`` (EMA stochastic-rounding generator state), ``epoch`` (completed epochs), ``step_in_epoch``
(optimizer steps done in the current epoch), ``global_step``, ``processes`` (one entry per training
process: ``rng`` from :func:`linvision.train.rng.capture` and the running epoch loss ``loss_sum``/
``samples``), ``sampler`` (``seed``, ``epoch``, ``start_batch``: the data-order state) and ``config``.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Union

import torch
from safetensors.torch import save_file

from linvision.errors import UserError

FORMAT = 1
_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]+\.tmp")  # tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")
PathLike = Union[str, "os.PathLike[str]"]


def _fsync_dir(directory: Path) -> None:
    """Persist a rename (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write(path: PathLike, write: Callable[[Path], Any]) -> None:
    """``write(tmp_path)`` then atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_folder(folder: PathLike, write: Callable[[Path], Any]) -> None:
    """``write(tmp_folder)`` into a new folder beside ``folder``, then swap it in for ``folder`` (an old one is
    renamed aside first and removed only after the swap; the new one is removed if ``write`` fails)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(state: Mapping[str, Any], path: PathLike) -> None:
    """``torch.save(state)`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: torch.save(dict(state, format=FORMAT), tmp))


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, on the CPU, with ``weights_only=True``.

    Anything else (a pickle holding other objects, a truncated or foreign file, another format version) is
    a :class:`~linvision.errors.UserError` saying that ``path`` is not a linvision checkpoint: no pickled
    code runs, and there is no advice to retry with ``weights_only=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol is not news: the error below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError, AttributeError, ImportError,
            IndexError, KeyError, TypeError) as err:  # what torch.load raises for foreign or damaged files
        kind = "it holds objects other than tensors and plain data" if isinstance(err, pickle.UnpicklingError) \
            else "it is truncated or not a torch.save file"
        raise UserError(f"{path} is not a linvision checkpoint ({kind})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path} is not a linvision checkpoint (format {found!r}, expected {FORMAT})")
    return state


def remove_stale_temporaries(folder: PathLike) -> List[Path]:
    """Delete the temporary files that interrupted atomic writes left in ``folder`` (``.<name>.<random>.tmp``,
    as :func:`atomic_path` names them); returns them. Call it at the start of a job, on its main process."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in folder.glob(".*.tmp"):
        if _TEMPORARY.fullmatch(tmp.name) and tmp.is_file():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def export_safetensors(state_dict: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] = ()) -> None:
    """Write weights as safetensors atomically (CPU copies, so tied or non-contiguous tensors are fine)."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    meta = {"format": "pt", **dict(metadata)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


__all__ = ["FORMAT", "atomic_folder", "atomic_path", "atomic_write", "export_safetensors", "load_checkpoint", "remove_stale_temporaries",
           "save_checkpoint"]
