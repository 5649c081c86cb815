"""Short depth-wise convolutions along the scan order (fla's ``ShortConvolution`` layout) for the delta mixers."""
from __future__ import annotations

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


__all__ = ["bidirectional_conv", "causal_conv", "short_conv"]
