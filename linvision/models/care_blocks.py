"""The building blocks of CARE Transformer (NCHW maps throughout), with the official names.

Paper: Zhou et al., "CARE Transformer: Mobile-Friendly Linear Visual Transformer via Decoupled Dual
Interaction" (CVPR 2025, arXiv 2411.16170). Official code read at
``zhouyuan888888/CARE-Transformer @400bf946479d8058a798233349facbe0b4f12897: models/CARETrans.py`` —
``TokenMixer`` → :class:`CARETokenMixer`, ``InterModule``, ``Head``, ``CAREBlock``, ``CAREStage`` (same
names, same attribute names and creation order, so state dicts load with ``strict=True`` and the same
seed gives the same initial weights). The model is :mod:`linvision.models.care`.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..kernels.linear_attn import linear_attention
from .drop_path import DropPath

ATT_EPS = 1e-6  # official: z = 1 / (q · mean(k) + 1e-6)


class CARETokenMixer(nn.Module):
    """Asymmetric decoupling of the channels (official ``TokenMixer``): ``(B, C, H, W) → (mem, feats)``.

    With ``g = mem_dim`` the channels split as ``(C − 3g, g, g, g)`` = memory, attention part, 3×3 part,
    7×7 part. The memory passes through untouched (``mem``); ``feats (B, 3g, H, W)`` concatenates

    - attention part: ``if_att`` (stages 3–4) — linear attention with ``φ = ELU + 1`` over all ``H·W``
      tokens, ``g / att_head_dim`` heads of ``att_head_dim`` channels, ``q, k`` from the 1×1 conv ``qk``,
      ``v`` the part itself: ``o = φ(q) (Σ φ(k) vᵀ / N) / (φ(q) · mean φ(k) + 1e-6)``, through
      :func:`linvision.kernels.linear_attn.linear_attention` (``mean=True``, fp32 state; the official
      computes the same with matmuls); otherwise (stages 1–2) the strip convs ``dwconvatt_1`` (11×1) +
      ``dwconvatt_2`` (1×11), depth-wise;
    - ``dwconv1`` (3×3) and ``dwconv2`` (7×7) depth-wise convs on the other two parts.
    """

    def __init__(self, in_channels: int, mem_dim: int, att_head_dim: int = 1, if_att: bool = False):
        super().__init__()
        g = mem_dim
        self.att_head_dim = att_head_dim
        self.if_att = if_att
        self.gc = g
        self.att_head_num = int(g / att_head_dim)
        self.split_indexes = (in_channels - 3 * g, g, g, g)
        if if_att:
            self.dwconv1 = nn.Conv2d(g, g, kernel_size=3, padding=1, groups=g)
            self.dwconv2 = nn.Conv2d(g, g, kernel_size=7, padding=3, groups=g)
            self.qk = nn.Conv2d(g, 2 * g, kernel_size=(1, 1))
        else:
            self.dwconvatt_1 = nn.Conv2d(g, g, kernel_size=(11, 1), padding=(5, 0), groups=g)
            self.dwconvatt_2 = nn.Conv2d(g, g, kernel_size=(1, 11), padding=(0, 5), groups=g)
            self.dwconv1 = nn.Conv2d(g, g, kernel_size=3, padding=1, groups=g)
            self.dwconv2 = nn.Conv2d(g, g, kernel_size=7, padding=3, groups=g)

    def attention(self, feat: Tensor) -> Tensor:
        """``(B, g, H, W)`` → ``(B, g, H, W)``: the ELU+1 linear attention of the attention part."""
        B, g, H, W = feat.shape
        heads = (B, self.att_head_num, self.att_head_dim, H * W)
        to_tokens = lambda t: t.reshape(heads).permute(0, 3, 1, 2)  # noqa: E731  (B, N, heads, d)
        q, k = self.qk(feat).split(self.gc, dim=1)
        o = linear_attention(to_tokens(q), to_tokens(k), to_tokens(feat), feature_map="elu+1", mean=True, eps=ATT_EPS)
        return o.permute(0, 2, 3, 1).reshape(B, g, H, W)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        mem, att, conv1, conv2 = torch.split(x, self.split_indexes, dim=1)
        att = self.attention(att) if self.if_att else self.dwconvatt_1(att) + self.dwconvatt_2(att)
        return mem, torch.cat([att, self.dwconv1(conv1), self.dwconv2(conv2)], dim=1)


def _mlp(prefix: str, module: nn.Module, dim: int, ratio: int, act_layer, with_fc2: bool = True) -> None:
    """Register ``<prefix>_{norm, fc1, act, conv, drop, fc2}``: BN → 1×1 → act → DW3×3 → dropout → 1×1."""
    hidden = ratio * dim
    setattr(module, f"{prefix}_norm", nn.BatchNorm2d(dim))
    setattr(module, f"{prefix}_fc1", nn.Conv2d(dim, hidden, kernel_size=1))
    setattr(module, f"{prefix}_act", act_layer())
    setattr(module, f"{prefix}_conv", nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden))
    setattr(module, f"{prefix}_drop", nn.Dropout(module.drop_rate))
    if with_fc2:
        setattr(module, f"{prefix}_fc2", nn.Conv2d(hidden, dim, kernel_size=1))


class InterModule(nn.Module):
    """Dual interaction: ``feats += inter1(feats)``, then ``y = cat(mem, feats)``, ``y += inter2(y)``.

    ``inter1`` acts on the ``3·mem_dim`` decoupled channels (expansion ``ratio[0]``), ``inter2`` on all
    ``in_features`` channels (expansion ``ratio[1]``). With ``last`` (the network's final block)
    ``inter2`` has no ``fc2`` and no residual: the output has ``ratio[1]·in_features`` channels (the
    classifier width ``cls_dim``).
    """

    def __init__(self, in_features: int, ratio: Sequence[int], mem_dim: int, act_layer=nn.GELU,
                 drop: float = 0.0, last: bool = False):
        super().__init__()
        self.last = last
        self.drop_rate = drop
        _mlp("inter1", self, 3 * mem_dim, ratio[0], act_layer)
        _mlp("inter2", self, in_features, ratio[1], act_layer, with_fc2=not last)

    @staticmethod
    def _branch(m: nn.Module, prefix: str, x: Tensor) -> Tensor:
        for part in ("norm", "fc1", "act", "conv", "drop"):
            x = getattr(m, f"{prefix}_{part}")(x)
        return x

    def forward(self, x: Tuple[Tensor, Tensor]) -> Tensor:
        mem, feats = x
        feats = self.inter1_fc2(self._branch(self, "inter1", feats)) + feats
        cat = torch.cat([mem, feats], dim=1)
        out = self._branch(self, "inter2", cat)
        return out if self.last else self.inter2_fc2(out) + cat


class CAREBlock(nn.Module):
    """``x + drop_path(γ ⊙ inter_layer(token_mixer(x)))``; the last block: ``drop_path(inter_layer(token_mixer(x)))``."""

    def __init__(self, dim: int, mem_dim: int, ratio: Sequence[int], act_layer=nn.GELU, ls_init_value: float = 1e-6,
                 drop_path: float = 0.0, att_head_dim: int = 1, last: bool = False, if_att: bool = False):
        super().__init__()
        self.last = last
        self.token_mixer = CARETokenMixer(dim, mem_dim=mem_dim, att_head_dim=att_head_dim, if_att=if_att)
        self.inter_layer = InterModule(dim, mem_dim=mem_dim, ratio=ratio, act_layer=act_layer, last=last)
        if not last:
            self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.inter_layer(self.token_mixer(x))
        if self.last:
            return self.drop_path(y)
        if self.gamma is not None:
            y = y * self.gamma.reshape(1, -1, 1, 1)
        return self.drop_path(y) + x


class CAREStage(nn.Module):
    """``downsample`` (BN → Conv 2×2 stride 2; identity for the first stage), then ``depth`` CARE blocks."""

    def __init__(self, in_chs: int, out_chs: int, ds_stride: int, depth: int, drop_path_rates: Sequence[float],
                 ls_init_value: float, act_layer, ratio: Sequence[int], if_att: bool, att_head_dim: int,
                 mem_dim: int, last_stage: bool):
        super().__init__()
        self.grad_checkpointing = False
        self.out_chs = out_chs
        if ds_stride > 1:
            self.downsample = nn.Sequential(nn.BatchNorm2d(in_chs),
                                            nn.Conv2d(in_chs, out_chs, kernel_size=ds_stride, stride=ds_stride))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            CAREBlock(out_chs, mem_dim=mem_dim, ratio=ratio, act_layer=act_layer, ls_init_value=ls_init_value,
                      drop_path=drop_path_rates[i], att_head_dim=att_head_dim, if_att=if_att,
                      last=last_stage and i == depth - 1)
            for i in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
            return x
        return self.blocks(x)


class Head(nn.Module):
    """Global average pool → GELU → LayerNorm(eps 1e-6) → dropout → ``fc``: ``(B, cls_dim, h, w) → (B, classes)``."""

    def __init__(self, cls_dim: int, num_classes: int = 1000, drop: float = 0.0):
        super().__init__()
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(cls_dim, eps=1e-6)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(cls_dim, num_classes) if num_classes > 0 else nn.Identity()

    def pre_logits(self, x: Tensor) -> Tensor:
        return self.drop(self.norm(self.act(x.mean((2, 3)))))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pre_logits(x))


__all__ = ["CAREBlock", "CAREStage", "CARETokenMixer", "Head", "InterModule"]
