"""Stochastic depth (Huang et al., 2016, as timm's ``DropPath``) whose keep/drop decisions can be seeded per sample.

timm's ``DropPath`` draws one Bernoulli per sample from the process's global generator, so splitting a global
batch over N processes changes which samples drop a branch. :class:`DropPath` is timm's module (a subclass:
same arguments, ``isinstance`` and no state) that, inside :func:`per_sample_drop_path`, decides instead from
the sample's own key: sample ``b`` keeps the branch of the ``j``-th DropPath of the model (``model.modules()``
order) when ``u[b, j] < keep_prob``, with ``u[b, j]`` the ``j``-th 32-bit word of
``numpy.random.SeedSequence([*key_b, STREAM]).generate_state(M)`` divided by 2³². The same sample under the
same key then gets the same mask however the batch is split. A model called again within the block (e.g.
activation checkpointing's recomputation) sees the same masks. Outside the block, or for a module not in
training mode, it is exactly timm's ``DropPath``.

Each instance must be called once per forward: a module applied to two residual branches would give both the
same mask, so the blocks hold one instance per branch.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from timm.layers import DropPath as TimmDropPath
from torch import Tensor, nn

from ..kernels.validation import check_bool, check_float

STREAM = 0x64726F70  # "drop": separates these words from other streams seeded with the same key (augmentation)

SampleKey = Union[int, Sequence[int]]


class DropPath(TimmDropPath):
    """``x (B, ...)`` → ``x · keep_b / keep_prob`` per sample ``b`` in training, ``x`` otherwise.

    ``drop_prob`` in [0, 1]; ``scale_by_keep``: divide the kept samples by ``keep_prob`` (timm's default).
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__(check_float("drop_prob", drop_prob, min=0.0, max=1.0), check_bool("scale_by_keep", scale_by_keep))
        self.sample_uniforms: Optional[Tensor] = None  # (B,) float64, set only inside per_sample_drop_path

    def forward(self, x: Tensor) -> Tensor:
        u = self.sample_uniforms
        if u is None or self.drop_prob == 0.0 or not self.training:
            return super().forward(x)
        if x.shape[0] != u.shape[0]:
            raise ValueError(f"per_sample_drop_path was given {u.shape[0]} sample keys, but this DropPath got a "
                             f"batch of {x.shape[0]}")
        keep_prob = 1.0 - self.drop_prob
        mask = (u < keep_prob).to(device=x.device, dtype=x.dtype).view((x.shape[0],) + (1,) * (x.ndim - 1))
        if keep_prob > 0.0 and self.scale_by_keep:
            mask = mask.div_(keep_prob)
        return x * mask


def drop_path_modules(model: nn.Module) -> List[DropPath]:
    """The :class:`DropPath` modules of ``model`` in ``model.modules()`` order (their index ``j`` in the keys)."""
    return [m for m in model.modules() if isinstance(m, DropPath)]


def sample_uniforms(keys: Sequence[SampleKey], count: int) -> Tensor:
    """``(len(keys), count)`` float64 uniforms in [0, 1): row ``b`` from ``SeedSequence([*keys[b], STREAM])``."""
    rows = []
    for key in keys:
        entropy = [int(key)] if isinstance(key, (int, np.integer)) else [int(k) for k in key]
        if any(k < 0 for k in entropy):
            raise ValueError(f"sample keys must be non-negative ints, got {key!r}")
        rows.append(np.random.SeedSequence(entropy + [STREAM]).generate_state(count))
    words = np.stack(rows) if rows else np.zeros((0, count), dtype=np.uint32)
    return torch.from_numpy(words.astype(np.float64) / 2.0**32)


@contextlib.contextmanager
def per_sample_drop_path(model: nn.Module, keys: Sequence[SampleKey]) -> Iterator[None]:
    """Inside the block, every :class:`DropPath` of ``model`` decides sample ``b`` from ``keys[b]`` (an int or a
    tuple of non-negative ints, e.g. ``(seed, epoch, dataset index)``); the global generators are not drawn from.

    ``keys`` has one entry per sample of each batch the model sees inside the block. The modules are restored
    on exit (also on an exception).
    """
    modules = drop_path_modules(model)
    if not modules:
        yield
        return
    uniforms = sample_uniforms(keys, len(modules))
    for j, m in enumerate(modules):
        m.sample_uniforms = uniforms[:, j]
    try:
        yield
    finally:
        for m in modules:
            m.sample_uniforms = None


__all__ = ["DropPath", "STREAM", "drop_path_modules", "per_sample_drop_path", "sample_uniforms"]
