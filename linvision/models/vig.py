"""ViG, the plain (isotropic) vision GLA model, in timm: ``vig_{tiny,small,base}_patch16_224``.

Paper: Liao et al., "ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention", AAAI 2025
(arXiv 2405.18425). Official code: ``hustvl/ViG`` at ``dfb9d32``, ``classification/models/vig.py::ViG`` with
``classification/configs/vig/vig-{t,s,b}.yaml``:

- patch embedding ``V2PatchEmbed``: Conv(3→D/2, 9×9, stride 8, pad 1) → LayerNorm2d → SiLU → Conv(D/2→D, 3×3,
  stride 2, pad 1) → LayerNorm2d (16× down-sampling), no class token, absolute position embedding (resized
  bicubic to other grids);
- 12 pre-norm blocks ``x += attn(RMSNorm(x))``, ``x += MLP(RMSNorm(x))`` with RMSNorm eps 1e-6, the MLP
  ``fc2(SiLU(fc1 x))`` of ratio 4, and ``attn`` ViG's bidirectional GLA block (the ``gla`` mixer,
  :mod:`linvision.mixers.gla`, ``expand_k=0.5``);
- final RMSNorm, average pooling of the patch tokens, linear head;
- T: 192 dim, 3 heads, ``use_out_act=True``, conv SiLU on; S: 384 / 6, B: 768 / 12, conv SiLU off;
  drop path 0.1 / 0.2 / 0.5 in the configs (not the model defaults);
- init: every Linear ``normal(0, 0.02)`` with zero bias, then the GLA blocks' own Xavier init; position
  embedding ``trunc_normal(0.02)``.

The hierarchical ViG-H (``vig_h.py``) is not built here. Parameter names are the official ones (``patch_embed.proj.{0,1,3,4}``, ``blocks.i.{attn_norm,attn,mlp_norm,mlp}``,
``norm``, ``head``). Deviations: the official MLP's act is ``ACT2FN["swish"]`` (SiLU), same here; no class-token,
``use_msg``, RoPE or SwiGLU options (off in every config); stochastic depth as in timm.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from ..mixers import create_mixer
from .drop_path import DropPath

__all__ = ["ViG", "default_cfgs"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``(B, C, H, W)`` (ViG's ``LayerNorm2d``)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class V2PatchEmbed(nn.Module):
    """ViG's two-stage convolutional stem, 16× down-sampling: ``(B, 3, H, W)`` → ``(B, h·w, D)`` and ``(h, w)``."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 16):
        super().__init__()
        stride = patch_size // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, stride + 1, stride=stride, padding=1),
            LayerNorm2d(embed_dim // 2),
            nn.SiLU(),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1),
            LayerNorm2d(embed_dim),
        )

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class MLP(nn.Module):
    """``fc2(SiLU(fc1 x))`` (ViG's ``MLP`` with ``hidden_act="swish"``)."""

    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GLABlock(nn.Module):
    """Pre-norm block: ``x + attn(RMSNorm(x))``, then ``+ MLP(RMSNorm(·))``; ``attn`` is the ``gla`` mixer."""

    def __init__(self, dim: int, num_heads: int, drop_path: float, mlp_ratio: float, eps: float, **gla: Any):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim, eps=eps)
        self.attn = create_mixer("gla", dim, num_heads, **gla)
        self.mlp_norm = nn.RMSNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()  # one instance per residual branch, so each draws its own per-sample mask (drop_path.py)

    def forward(self, x: Tensor, hw: Tuple[int, int]) -> Tensor:
        x = x + self.drop_path(self.attn(self.attn_norm(x), hw))
        return x + self.drop_path2(self.mlp(self.mlp_norm(x)))


class ViG(nn.Module):
    """The plain ViG classifier (see the module docstring): image ``(B, C, H, W)`` → logits."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        expand_k: float = 0.5,
        use_out_act: bool = False,
        use_act_in_conv: bool = True,
        rms_norm_eps: float = 1e-6,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mixer_kwargs: Optional[Dict[str, Any]] = None,
        global_pool: str = "avg",
    ):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"ViG pools by averaging the patch tokens; global_pool must be 'avg', got {global_pool!r}")
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.patch_embed = V2PatchEmbed(in_chans, embed_dim, patch_size)
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # linspace(0, rate, depth)
        gla = dict(expand_k=expand_k, use_out_act=use_out_act, use_act_in_conv=use_act_in_conv, **(mixer_kwargs or {}))
        self.blocks = nn.ModuleList(GLABlock(embed_dim, num_heads, dpr[i], mlp_ratio, rms_norm_eps, **gla) for i in range(depth))
        self.norm = nn.RMSNorm(embed_dim, eps=rms_norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """ViG's init: Linear ``normal(0, 0.02)``, zero bias; GLA blocks' own init; pos embed ``trunc_normal(0.02)``."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:
            blk.attn.init_weights()
        trunc_normal_(self.pos_embed, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → normalised patch tokens ``(B, h·w, D)``."""
        x, hw = self.patch_embed(x)
        pos = self.pos_embed
        if hw != self.grid:
            pos = resample_abs_pos_embed(pos, new_size=list(hw), old_size=list(self.grid), num_prefix_tokens=0)
        x = self.pos_drop(x + pos)
        for blk in self.blocks:
            x = blk(x, hw)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> Dict[str, Any]:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj.0", "classifier": "head", "license": "mit", **kwargs}


# No weights are published here: every cfg is the untrained architecture.
default_cfgs = generate_default_cfgs({f"vig_{s}_patch16_224": _cfg() for s in ("tiny", "small", "base")})

VARIANTS = {  # classification/configs/vig/vig-{t,s,b}.yaml
    "tiny": dict(embed_dim=192, num_heads=3, use_out_act=True, use_act_in_conv=True),
    "small": dict(embed_dim=384, num_heads=6, use_out_act=False, use_act_in_conv=False),
    "base": dict(embed_dim=768, num_heads=12, use_out_act=False, use_act_in_conv=False),
}


def _create_vig(size: str, pretrained: bool = False, **kwargs) -> ViG:
    return build_model_with_cfg(ViG, f"vig_{size}_patch16_224", pretrained, **dict(VARIANTS[size], **kwargs))


@register_model
def vig_tiny_patch16_224(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-T (192 dim, 12 blocks, 3 heads)."""
    return _create_vig("tiny", pretrained, **kwargs)


@register_model
def vig_small_patch16_224(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-S (384 dim, 12 blocks, 6 heads)."""
    return _create_vig("small", pretrained, **kwargs)


@register_model
def vig_base_patch16_224(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-B (768 dim, 12 blocks, 12 heads)."""
    return _create_vig("base", pretrained, **kwargs)
