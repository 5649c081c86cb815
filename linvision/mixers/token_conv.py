"""Depth-wise convolution over the image grid of token-major rows, for any range of tokens.

The local terms of LiT (DWC), DyDiLA, LINA and NaLaFormer (LePE) are depth-wise ``k×k`` convolutions of
``V`` over the ``h×w`` grid. Evaluated as ``conv2d`` on a ``(B, C, h, w)`` copy, PyTorch's CPU
depth-wise kernel grows super-linearly with the grid (5×5, C = 256: 20 ms at 64², 97 ms at 128², 1.2 s at
256², one thread), and the full-size input copy and output add two large temporaries. Here the
tokens are read in place as a channels-last grid (no transposition: a token's channels are contiguous)
and only the grid rows that cover the requested tokens (plus the ``k // 2`` halo rows) are convolved,
so a caller that walks the sequence in chunks never holds a full-size local term. Values equal the
full ``conv2d`` up to rounding (summation order of the ``k²`` products, ~1e-7 relative in fp32).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def depthwise_conv_tokens(
    tokens: Tensor,
    hw: Tuple[int, int],
    num_prefix_tokens: int,
    weight: Tensor,
    bias: Optional[Tensor],
    start: int = 0,
    stop: Optional[int] = None,
) -> Tensor:
    """Zero-padded depth-wise conv (``groups = C``, stride 1, odd ``k``) of the image tokens, rows ``start:stop``.

    ``tokens (B, P + h·w, C)`` (any strides; prefix tokens first, image tokens in raster order),
    ``weight (C, 1, k, k)``, ``bias (C,)`` or None. Returns ``(B, stop − start, C)`` in ``tokens``' dtype:
    the conv output of each image token in the range and zeros for prefix tokens.
    """
    B, N, C = tokens.shape
    h, w = hw
    P = num_prefix_tokens
    stop = N if stop is None else min(stop, N)
    pad = weight.shape[-1] // 2
    i0, i1 = max(start - P, 0), max(stop - P, 0)  # image tokens in the range
    parts = []
    if start < P:
        parts.append(tokens.new_zeros(B, min(stop, P) - start, C))
    if i1 > i0:
        r0, r1 = i0 // w, -(-i1 // w)  # grid rows covering them
        lo, hi = max(r0 - pad, 0), min(r1 + pad, h)
        grid = tokens[:, P + lo * w : P + hi * w].unflatten(1, (hi - lo, w)).permute(0, 3, 1, 2)  # channels-last
        grid = F.pad(grid, (0, 0, pad - (r0 - lo), pad - (hi - r1)))  # zero rows past the image edge
        grid = grid.contiguous(memory_format=torch.channels_last)  # a no-op unless pad kept another layout
        out = F.conv2d(grid, weight, bias, padding=(0, pad), groups=C)  # (B, C, r1 − r0, w)
        parts.append(out.permute(0, 2, 3, 1).flatten(1, 2)[:, i0 - r0 * w : i1 - r0 * w])
    return parts[0] if len(parts) == 1 else F.pad(parts[1], (0, 0, parts[0].shape[1], 0))


def depthwise_conv_reach(hw: Tuple[int, int], kernel_size: int) -> int:
    """Tokens before a range that :func:`depthwise_conv_tokens` of a ``kernel_size`` kernel may read: its halo rows
    and the partial row the range starts in, ``(k // 2 + 1)·w``."""
    return (kernel_size // 2 + 1) * hw[1]
