"""Random-number state: seeding, capture/restore as ``weights_only``-loadable values, and per-sample streams.

The job draws random numbers in three places:

- the training step (mixup/cutmix choice and box: numpy; dropout: torch; on CUDA also the CUDA generators),
  from each process's global generators, whose state goes into every checkpoint;
- drop-path in linvision's models: each sample's keep/drop decisions from ``(seed, epoch, index)`` and the
  module's position (:func:`linvision.models.drop_path.per_sample_drop_path`), whatever the process count;
- the data order: a pure function of ``(seed, epoch)`` (:class:`linvision.train.data.EpochSampler`);
- augmentation: each sample is transformed under generators seeded from ``(seed, epoch, index)``
  (:func:`seeded`), so an image's augmentation does not depend on worker count, worker seeds or where
  a run was resumed.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 32-bit seed for one sample of one epoch (numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with python, numpy and torch-CPU generators seeded by ``seed``; restore them after.

    CUDA generators are left alone (``torch.manual_seed`` would reseed them too), so this is safe in the
    training process as well as in data-loader workers.
    """
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


@contextlib.contextmanager
def cpu_threads(threads: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block (``None``: unchanged); the old count restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def capture() -> Dict[str, Any]:
    """This process's generator states as tensors and plain values (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = list(torch.cuda.get_rng_state_all())
    return {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture`. CUDA states are restored when the device count matches."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


__all__ = ["capture", "cpu_threads", "restore", "sample_seed", "seed_everything", "seeded"]
