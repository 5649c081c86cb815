"""NaLaFormer's building blocks (``ZacharyMeng/NaLaFormer: NaLaformer/NALA.py`` @1f1c10ae, official names and
creation order): ``LayerNorm2d``, ``FeedForwardNetwork``, ``Block``, ``PatchMerging``, ``PatchEmbed``, ``RoPE`` and
``BasicLayer`` (one stage). The backbone that stacks them, its timm interface and its registry entry points are in
:mod:`linvision.models.nalaformer`, whose docstring describes the architecture and the deviations.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..mixers import create_mixer
from .drop_path import DropPath
from .layout import layer_options

# The model has no prefix tokens: mixers with prefix-token machinery (plstm) skip its parameters.
NO_PREFIX_DEFAULTS = {"prefix_mode": "bypass"}


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map (official: permute, ``nn.LayerNorm`` as ``norm``, permute)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FeedForwardNetwork(nn.Module):
    """``fc1 → GELU → (dwconv3×3 + residual) → fc2`` on an NCHW map (official names and order)."""

    def __init__(self, embed_dim: int, ffn_dim: int, drop: float = 0.0):
        super().__init__()
        self.embed_dim, self.ffn_dim = embed_dim, ffn_dim
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.dwconv = nn.Conv2d(ffn_dim, ffn_dim, 3, 1, 1, groups=ffn_dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        x = F.gelu(self.fc1(x.permute(0, 2, 3, 1)))  # (B, H, W, F)
        x = x.permute(0, 3, 1, 2)
        x = self.dwconv(x) + x
        x = self.drop(self.fc2(x.permute(0, 2, 3, 1)))
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    """One NaLaFormer block on an NCHW map (see the module docstring); ``attn`` is any linvision mixer."""

    def __init__(
        self,
        mixer: str,
        embed_dim: int,
        num_heads: int,
        ffn_dim: int,
        drop_path: float = 0.0,
        layerscale: bool = False,
        layer_init_value: float = 1e-6,
        mixer_kwargs: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__()
        self.layerscale = layerscale
        self.embed_dim = embed_dim
        self.norm1 = LayerNorm2d(embed_dim, eps=1e-6)
        self.attn = create_mixer(mixer, embed_dim, num_heads, **dict(mixer_kwargs or {}))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()  # one instance per residual branch, so each draws its own per-sample mask (drop_path.py)
        self.norm2 = LayerNorm2d(embed_dim, eps=1e-6)
        self.ffn = FeedForwardNetwork(embed_dim, ffn_dim)
        self.cpe1 = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1, groups=embed_dim)
        self.cpe2 = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1, groups=embed_dim)
        if layerscale:
            self.gamma_1 = nn.Parameter(layer_init_value * torch.ones(1, embed_dim, 1, 1))
            self.gamma_2 = nn.Parameter(layer_init_value * torch.ones(1, embed_dim, 1, 1))

    def mix(self, x: Tensor) -> Tensor:
        """``attn(norm1(x))`` on an NCHW map: the mixer sees ``(B, h·w, C)`` tokens in raster order."""
        B, C, H, W = x.shape
        tokens = self.norm1.norm(x.permute(0, 2, 3, 1)).reshape(B, H * W, C)
        return self.attn(tokens, (H, W), 0).transpose(1, 2).reshape(B, C, H, W)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.cpe1(x)
        y = self.mix(x)
        x = x + self.drop_path(self.gamma_1 * y if self.layerscale else y)
        x = x + self.cpe2(x)
        y = self.ffn(self.norm2(x))
        return x + self.drop_path2(self.gamma_2 * y if self.layerscale else y)


class PatchMerging(nn.Module):
    """``Conv3×3 stride 2`` (``reduction``) + ``BatchNorm2d`` (``norm``): ``(B, C, H, W) → (B, C', ⌈H/2⌉, ⌈W/2⌉)``."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.reduction(x))


class PatchEmbed(nn.Module):
    """The stem: four 3×3 convs (strides 2, 1, 1, 2) with BN and GELU between, as ``proj`` (official)."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96):
        super().__init__()
        self.in_chans, self.embed_dim = in_chans, embed_dim
        half = embed_dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, embed_dim, 3, 2, 1), nn.BatchNorm2d(embed_dim),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class RoPE(nn.Module):
    """Holds the official per-stage RoPE ``angle`` buffer, so official state dicts load strictly.

    ``angle = 1/10000^linspace(0, 1, head_dim // 4)``, each twice. The NaLa mixers build their sin/cos
    tables from ``hw`` themselves (:func:`linvision.mixers.nala.rope_2d`, the same values); this buffer
    is not read in the forward pass.
    """

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        n = embed_dim // num_heads // 4
        angle = 1.0 / (10000 ** torch.linspace(0, 1, n, device="cpu"))
        self.register_buffer("angle", angle.unsqueeze(-1).repeat(1, 2).flatten().to(torch.empty(0).device))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks, then the optional ``downsample`` (PatchMerging to the next stage's width)."""

    def __init__(
        self,
        mixers: Sequence[str],
        embed_dim: int,
        out_dim: Optional[int],
        depth: int,
        num_heads: int,
        ffn_dim: int,
        drop_path: Sequence[float],
        downsample: bool,
        layerscale: bool = False,
        layer_init_value: float = 1e-6,
        mixer_kwargs: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.grad_checkpointing = False
        self.RoPE = RoPE(embed_dim, num_heads)
        self.blocks = nn.ModuleList(
            Block(mixers[i], embed_dim, num_heads, ffn_dim, drop_path[i], layerscale, layer_init_value,
                  layer_options(mixers[i], mixer_kwargs, NO_PREFIX_DEFAULTS))
            for i in range(depth)
        )  # fmt: skip
        self.downsample = PatchMerging(embed_dim, out_dim) if downsample else None

    def forward_blocks(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


__all__ = ["BasicLayer", "Block", "FeedForwardNetwork", "LayerNorm2d", "PatchEmbed", "PatchMerging", "RoPE"]
