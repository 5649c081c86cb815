"""2-D neighbourhoods on the image-token grid, as shifted views: the window part of LoLCATs and Liger.

A window around image token ``(y, x)`` is a set of offsets ``(dy, dx)``: CLEAR's open disc
``dy² + dx² < r²`` (the predicate of :func:`linvision.kernels.window_attn.naive.window_mask`) or the square
``|dy| < r, |dx| < r`` (side ``2r − 1``). Offsets that leave the grid are invalid (no wrap-around).
Each offset is one shifted view of a zero-padded grid, so the work is ``O(N · |window| · D)`` and no
``N × N`` matrix and no ``|window|``-fold copy of the keys is made.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

SHAPES = ("disc", "square")


def window_offsets(shape: str, radius: int) -> List[Tuple[int, int]]:
    """The ``(dy, dx)`` offsets of a window of ``shape`` and ``radius`` (raster order, ``(0, 0)`` included)."""
    span = range(-(radius - 1), radius)
    if shape == "disc":
        return [(dy, dx) for dy in span for dx in span if dy * dy + dx * dx < radius * radius]
    return [(dy, dx) for dy in span for dx in span]


def window_rows(hw: Tuple[int, int], num_prefix_tokens: int, shape: str, radius: int, start: int, stop: int,
                device=None) -> Tensor:
    """Boolean ``[stop − start, N]`` window membership of query rows ``start:stop`` (``N = T + h·w``).

    Prefix rows: every key. Image rows: every prefix key and the image keys of the window.
    """
    h, w = hw
    T = num_prefix_tokens
    rows = torch.arange(start, stop, device=device)
    mask = torch.zeros(stop - start, T + h * w, dtype=torch.bool, device=device)
    mask[:, :T] = True
    image = rows >= T
    mask[~image] = True
    idx = torch.arange(h * w, device=device)
    ky, kx = idx // w, idx % w
    qi = rows[image] - T
    dy, dx = ky[None] - (qi // w)[:, None], kx[None] - (qi % w)[:, None]
    if shape == "disc":
        inside = dy * dy + dx * dx < radius * radius
    else:
        inside = (dy.abs() < radius) & (dx.abs() < radius)
    mask[image, T:] = inside
    return mask


def shifted(t: Tensor, hw: Tuple[int, int], offsets: List[Tuple[int, int]], rows: Optional[Tuple[int, int]] = None
            ) -> Iterator[Tuple[Tensor, Tensor]]:
    """For image tokens ``t [B, h·w, H, D]``: per offset, ``(t at (y + dy, x + dx) [B, h, w, H, D] (zeros
    outside), valid [h, w] bool)``. The shifted tensors are strided views of one padded copy (no per-offset
    copy, also not in what autograd saves).

    ``rows = (a, b)``: only the grid rows ``a:b`` of each view (``[B, b − a, w, H, D]``, ``valid [b − a, w]``),
    and the padded copy holds only the rows they reach (a band of ``b − a + 2p`` rows, not the whole grid).
    """
    h, w = hw
    a, b = (0, h) if rows is None else rows
    B, _, H, D = t.shape
    p = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    lo, hi = max(a - p, 0), min(b + p, h)  # the grid rows the band's windows reach
    pad = (p, p, p - (a - lo), b + p - hi)  # padded row r is grid row a − p + r
    grid = F.pad(t.reshape(B, h, w, H, D)[:, lo:hi], (0, 0, 0, 0) + pad)
    ones = F.pad(torch.ones(hi - lo, w, dtype=torch.bool, device=t.device), pad)
    n = b - a
    for dy, dx in offsets:
        yield grid[:, p + dy : p + dy + n, p + dx : p + dx + w], ones[p + dy : p + dy + n, p + dx : p + dx + w]


__all__ = ["SHAPES", "shifted", "window_offsets", "window_rows"]
