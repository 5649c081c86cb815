"""Orientation frames of the 2-D pLSTM: the grid flipped per orientation and padded to whole chunks, and back.

Orientation ``o`` scans the grid flipped by ``ORIENTATION_FLIPS[o]`` (a *frame*, padded at its high-x / high-y
end with zeros). :func:`to_frames` builds the frames of ``[B, N, H, D]`` tokens, :func:`from_frames` crops, flips
back and sums them. The two maps are adjoint (the gradient of one is the other), so each is an autograd function
whose backward is the other map. Both run in strips of grid rows written into one output: no full-grid
temporary besides it (a flipped or summed copy of the whole grid per orientation costs a page-faulted fresh
allocation per call on a large grid, so the cost per token would grow with the grid).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .naive import ORIENTATION_FLIPS

STRIP_ELEMENTS = 1 << 18  # elements of one strip of grid rows (1 MiB in fp32)


def _strips(X: int, per_row: int):
    """``(a, b)`` ranges of about :data:`STRIP_ELEMENTS` elements over ``X`` rows of ``per_row`` elements."""
    step = max(1, STRIP_ELEMENTS // max(1, per_row))
    return [(a, min(a + step, X)) for a in range(0, X, step)]


def _rows(a: int, b: int, X: int, flip_x: bool) -> slice:
    """The frame rows of grid rows ``a:b`` (and back: the map is its own inverse); reversed when ``flip_x``."""
    return slice(X - b, X - a) if flip_x else slice(a, b)


def _flipped(t: Tensor, o: int) -> Tensor:
    """``t [B, H, rows, Y, ...]`` flipped in x and y as orientation ``o``'s frame is."""
    fx, fy = ORIENTATION_FLIPS[o]
    dims = [d for d, f in ((2, fx), (3, fy)) if f]
    return t.flip(dims) if dims else t


Orientations = Union[int, Sequence[int]]  # O (the orientations 0..O−1), or the orientation of each frame


def _orientations(orientations: Orientations) -> Sequence[int]:
    return range(orientations) if isinstance(orientations, int) else orientations


def frame_copies(
    t: Tensor, hw: Tuple[int, int], O: Orientations, padded: Tuple[int, int], dtype: torch.dtype,
    rows: Optional[Tuple[int, int]] = None,
) -> Tensor:
    """``[B, N, H, *rest]`` → ``[B, H, O, Xp, Yp, *rest]`` in ``dtype``: one flipped, zero-padded copy per
    orientation (``O``: their count, or the orientation of each copy), written strip by strip. ``rows = (r0, r1)``:
    only the frame rows ``r0:r1`` (``[B, H, O, r1 − r0, Yp, *rest]``)."""
    X, Y = hw
    Xp, Yp = padded
    r0, r1 = (0, Xp) if rows is None else rows
    B, _, H, *rest = t.shape
    orientations = _orientations(O)
    grid = t.unflatten(1, (X, Y))  # [B, X, Y, H, *rest]
    f = torch.empty(B, H, len(orientations), r1 - r0, Yp, *rest, dtype=dtype, device=t.device)
    real = max(0, min(r1, X) - r0)  # frame rows r0 .. r0 + real hold grid rows, the others are padding
    f[:, :, :, real:].zero_()
    f[:, :, :, :real, Y:].zero_()
    for i, o in enumerate(orientations):
        for a, b in _strips(real, B * Y * H * math.prod(rest)):
            part = grid[:, _rows(r0 + a, r0 + b, X, ORIENTATION_FLIPS[o][0])].movedim(3, 1).to(dtype)
            f[:, :, i, a:b, :Y] = _flipped(part, o)  # part: [B, H, rows, Y, *rest]
    return f


def add_frame_rows(f: Tensor, hw: Tuple[int, int], orientations: Sequence[int], r0: int, out: Tensor) -> None:
    """Add frames holding frame rows ``r0 : r0 + R`` (``f [B, H, O, R, Yp, D]``, the ``i``-th of orientation
    ``orientations[i]``) into ``out [B, N, H, D]``, cropped and flipped back to the grid rows they hold."""
    X, Y = hw
    real = max(0, min(r0 + f.shape[3], X) - r0)
    grid = out.unflatten(1, (X, Y))  # [B, X, Y, H, D]
    for i, o in enumerate(orientations):
        if real:
            grid[:, _rows(r0, r0 + real, X, ORIENTATION_FLIPS[o][0])] += _flipped(f[:, :, i, :real, :Y], o).movedim(1, 3)


def chunk_nodes(f: Tensor, C: int) -> Tensor:
    """Frames ``[..., NX·C, NY·C, D]`` → chunks ``[..., NX, NY, C², D]`` (each chunk's nodes in raster order)."""
    *lead, Xp, Yp, D = f.shape
    f = f.reshape(*lead, Xp // C, C, Yp // C, C, D).transpose(-4, -3)
    return f.reshape(*lead, Xp // C, Yp // C, C * C, D)


def unchunk_nodes(f: Tensor, C: int) -> Tensor:
    """The inverse of :func:`chunk_nodes`: ``[..., NX, NY, C², D]`` → ``[..., NX·C, NY·C, D]``."""
    *lead, NX, NY, _, D = f.shape
    return f.reshape(*lead, NX, NY, C, C, D).transpose(-4, -3).reshape(*lead, NX * C, NY * C, D)


def frame_sum(f: Tensor, hw: Tuple[int, int]) -> Tensor:
    """``[B, H, O, Xp, Yp, D]`` → ``[B, N, H, D]``: crop, flip back, sum the orientations, strip by strip."""
    X, Y = hw
    B, H, O, _, _, D = f.shape
    grid = torch.empty(B, X, Y, H, D, dtype=f.dtype, device=f.device)
    for a, b in _strips(X, B * Y * H * D):
        total = None
        for o in range(O):
            part = _flipped(f[:, :, o, _rows(a, b, X, ORIENTATION_FLIPS[o][0]), :Y], o)  # [B, H, rows, Y, D]
            total = part if total is None else total + part
        grid[:, a:b] = total.movedim(1, 3)
    return grid.flatten(1, 2)


class _ToFrames(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, hw, O, padded, dtype):
        ctx.hw, ctx.dtype = hw, t.dtype
        return frame_copies(t, hw, O, padded, dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return frame_sum(grad, ctx.hw).to(ctx.dtype), None, None, None, None


class _FromFrames(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, hw):
        ctx.hw, ctx.O, ctx.padded = hw, f.shape[2], tuple(f.shape[3:5])
        return frame_sum(f, hw)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return frame_copies(grad, ctx.hw, ctx.O, ctx.padded, grad.dtype), None


def to_frames(t: Tensor, hw: Tuple[int, int], O: int, padded: Tuple[int, int], dtype: torch.dtype) -> Tensor:
    """``[B, N, H, D]`` → ``[B, H, O, Xp, Yp, D]`` (:func:`frame_copies`; backward :func:`frame_sum`)."""
    return _ToFrames.apply(t, tuple(hw), O, tuple(padded), dtype)


def from_frames(f: Tensor, hw: Tuple[int, int]) -> Tensor:
    """``[B, H, O, Xp, Yp, D]`` → ``[B, N, H, D]`` (:func:`frame_sum`; backward :func:`frame_copies`)."""
    return _FromFrames.apply(f, tuple(hw))


__all__ = ["add_frame_rows", "chunk_nodes", "frame_copies", "frame_sum", "from_frames", "to_frames", "unchunk_nodes"]
