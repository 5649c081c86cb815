"""SANA's Mix-FFN: a gated inverted bottleneck with a 3×3 depth-wise convolution, on tokens of a grid.

Paper: "SANA: Efficient High-Resolution Image Synthesis with Linear Diffusion Transformers", Xie et al.,
arXiv 2410.10629, §2.2 ("Mix-FFN": the depth-wise conv gives linear attention the local detail, and lets SANA
drop positional embeddings). Official: ``NVlabs/Sana: diffusion/model/nets/basic_modules.py::GLUMBConv``
(``use_bias=(True, True, False)``, ``act=("silu", "silu", None)``, SiLU gate); parameter names follow diffusers'
port ``diffusers/models/transformers/sana_transformer.py::GLUMBConv`` (``conv_inverted``, ``conv_depth``,
``conv_point``), so a ``SanaTransformerBlock.ff`` state dict loads as it is.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.validation import check_hw, check_int


class GLUMBConv(nn.Module):
    """``x (B, N, C)`` → ``(B, N, C_out)``, ``N = num_prefix_tokens + h·w`` (prefix tokens first)::

        u = SiLU(conv_inverted(x))            1×1, C → 2·hidden, with bias
        u = conv_depth(u)                     3×3 depth-wise on the (h, w) grid, zero padding, with bias
        y = conv_point(u[:hidden] · SiLU(u[hidden:]))   1×1, hidden → C_out, no bias

    ``hidden = hidden_features`` (SANA: ``int(2.5·C)``). Prefix tokens are not on the grid: each is its own
    1×1 image, so its depth-wise conv is the kernel's centre tap (plus bias) and no image token sees it.
    diffusers' ``GLUMBConv(residual_connection=False, norm_type=None)``, the form SANA blocks use.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None):
        super().__init__()
        in_features = check_int("in_features", in_features, min=1)
        hidden = check_int("hidden_features", hidden_features, min=1)
        out_features = in_features if out_features is None else check_int("out_features", out_features, min=1)
        self.hidden_features = hidden
        self.nonlinearity = nn.SiLU()
        self.conv_inverted = nn.Conv2d(in_features, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, out_features, 1, bias=False)

    def forward(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int = 0) -> Tensor:
        h, w = check_hw(hw)
        p = check_int("num_prefix_tokens", num_prefix_tokens, min=0)
        if x.dim() != 3 or x.shape[1] != p + h * w:
            raise ValueError(f"expected x of shape (B, {p} + {h}*{w}, C), got {tuple(x.shape)}")
        B = x.shape[0]
        u = self.nonlinearity(F.linear(x, self.conv_inverted.weight.flatten(1), self.conv_inverted.bias))
        grid = self.conv_depth(u[:, p:].transpose(1, 2).reshape(B, -1, h, w)).flatten(2).transpose(1, 2)
        if p:
            centre = self.conv_depth.weight[:, 0, 1, 1]
            u = torch.cat([u[:, :p] * centre + self.conv_depth.bias, grid], dim=1)
        else:
            u = grid
        value, gate = u.chunk(2, dim=-1)
        return F.linear(value * self.nonlinearity(gate), self.conv_point.weight.flatten(1))

    def extra_repr(self) -> str:
        return f"hidden_features={self.hidden_features}"


__all__ = ["GLUMBConv"]
