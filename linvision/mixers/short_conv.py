"""Short depth-wise convolutions along the scan order (fla's ``ShortConvolution`` layout) for the delta mixers.

:func:`causal_conv` and :func:`bidirectional_conv` filter a whole ``[B, N, C]`` sequence; :func:`short_conv_rows`
gives any range of their output rows from a window of the input that includes the ``K − 1`` halo tokens
(:func:`conv_halo`), so a mixer that walks the tokens in chunks never holds a full-size convolution input.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def short_conv(kernel_size: int, channels: int) -> nn.Conv1d:
    """A depth-wise ``Conv1d`` with fla's ``ShortConvolution`` parameter layout: ``weight [C, 1, K]``, no bias."""
    return nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=False)


def causal_conv(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """Causal depth-wise convolution along ``N`` of ``x [B, N, C]``: ``y_t = Σ_j w_j x_{t−K+1+j}``."""
    N = x.shape[1]
    y = F.conv1d(x.transpose(1, 2), conv.weight.to(x.dtype), None, padding=conv.kernel_size[0] - 1, groups=x.shape[-1])
    return y[..., :N].transpose(1, 2)


def bidirectional_conv(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """SANA's non-causal filter from one causal kernel (``GDN._bidirectional_causal_conv_1d``): the causal
    convolution forward plus the same along the reversed order, minus the shared centre tap ``w_{K−1}·x``."""
    centre = conv.weight[:, 0, -1].to(x.dtype)
    return causal_conv(x, conv) + causal_conv(x.flip(1), conv).flip(1) - x * centre


def conv_halo(start: int, stop: int, num_tokens: int, kernel_size: int, causal: bool) -> Tuple[int, int]:
    """The input rows ``[lo, hi)`` that output rows ``[start, stop)`` of an ``N``-token short convolution read:
    ``K − 1`` tokens before (and after, unless causal), clipped to the sequence."""
    halo = kernel_size - 1
    return max(start - halo, 0), stop if causal else min(stop + halo, num_tokens)


def short_conv_rows(window: Tensor, weight: Tensor, start: int, stop: int, num_tokens: int, causal: bool) -> Tensor:
    """Rows ``[start, stop)`` of :func:`causal_conv` (``causal``) or :func:`bidirectional_conv` of an ``N``-token
    sequence, from ``window [B, hi − lo, C]``, its input rows ``[lo, hi)`` = :func:`conv_halo` (any strides).

    ``weight [C, 1, K]`` (cast to the window's dtype). Returns ``[B, stop − start, C]``, equal to the full
    convolution's rows up to rounding: the bidirectional filter is the one symmetric kernel
    ``w_0 … w_{K−1} … w_0`` of ``2K − 1`` taps that its three terms add up to.
    """
    K = weight.shape[-1]
    lo, hi = conv_halo(start, stop, num_tokens, K, causal)
    w = weight.to(window.dtype)
    if not causal:
        w = torch.cat([w, w[..., :-1].flip(-1)], -1)
    before, after = (K - 1) - (start - lo), (0 if causal else K - 1) - (hi - stop)  # zeros past the sequence ends
    padded = F.pad(window.transpose(1, 2), (before, after))  # [B, C, stop − start + taps − 1]
    return F.conv1d(padded, w, groups=window.shape[-1]).transpose(1, 2)


__all__ = ["bidirectional_conv", "causal_conv", "conv_halo", "short_conv", "short_conv_rows"]
