"""CARE Transformer: a mobile linear-attention backbone with decoupled dual interaction, as timm models.

Paper: Zhou et al., "CARE Transformer: Mobile-Friendly Linear Visual Transformer via Decoupled Dual
Interaction" (CVPR 2025, arXiv 2411.16170). Official code read at
``zhouyuan888888/CARE-Transformer @400bf946479d8058a798233349facbe0b4f12897: models/CARETrans.py`` —
``CARENets`` → :class:`CARETransformer`, ``CARETrans_S{0,1,2}`` → ``care_s{0,1,2}``; blocks in
:mod:`linvision.models.care_blocks`.

>>> import linvision, timm
>>> m = timm.create_model("care_s0")                          # 7.34M params, 0.718 GMACs at 224²
>>> m = timm.create_model("care_s1", features_only=True)      # 4 NCHW maps at strides 4, 8, 16, 32

Architecture (``(B, 3, H, W)`` → logits)::

    stem          Conv 4×4 stride 4 + BN → (B, C1, H/4, W/4),  C_i = feat_dims[i] + mem_dims[i]
    stages[i]     (i > 0) BN + Conv 2×2 stride 2, then depth_i × CAREBlock
    CAREBlock     x + γ ⊙ InterModule(CARETokenMixer(x)); token mixer: strip convs (stages 1–2) or ELU+1
                  linear attention (stages 3–4) on one quarter-part, DW 3×3 and 7×7 on two more, the
                  memory part untouched; the network's last block expands to cls_dim (no residual)
    head, dist_head   pool → GELU → LayerNorm → Linear each; eval output = their mean (DeiT-style)

``forward_features`` returns the final map ``(B, cls_dim, H/32, W/32)`` (``num_features = cls_dim``);
``forward_head`` pools it and averages both heads (``pre_logits``: the mean of both heads' normalised
features, which is also what the model returns after ``reset_classifier(0)``).

Counts at 224² and 1000 classes, both heads included (measured with ``count_care`` in the tests and the
official class: identical): S0 7.340M / 0.718 GMACs, S1 9.602M / 1.029 GMACs, S2 19.481M / 1.923 GMACs;
the paper and README: 7.3M / 0.7, 9.6M / 1.0, 19.5M / 1.9.

Deviations from the official code:

- The linear attention runs on linvision's kernel (same equation, fp32 state; the official uses matmuls).
- Training output: the official returns ``(head, dist_head)`` in training mode for its DeiT hard-distillation
  loss; here that needs ``set_distilled_training(True)`` (as timm's distilled ViTs), otherwise the model
  returns the mean of the heads in training too, so plain classification loops work.
- ``forward_head`` averages both heads (official: ``head`` only). ``no_weight_decay`` is empty (the official
  returns ``{'norm'}``, which names no parameter). ``reset_classifier`` replaces both ``fc`` layers; only
  global average pooling is supported (``global_pool='avg'``).
- timm conventions added: ``features_only`` / ``forward_intermediates`` (the output of each stage),
  ``set_grad_checkpointing``, ``group_matcher``, ``drop_rate`` (the heads' dropout, official ``drop_rate``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from .care_blocks import CAREStage, Head

__all__ = ["CARETransformer", "default_cfgs"]  # register_model appends the entry points

ATT_STAGE = 2  # official att_layer: stages from index 2 on use linear attention


class CARETransformer(nn.Module):
    """CARE Transformer backbone (official ``CARENets``) with timm's model interface.

    Args (official names): in_chans, num_classes, depths, feat_dims, mem_dims (per stage; stage width
    ``feat + mem``), ratios (per stage ``(inter1, inter2)`` expansions), drop_rate (heads), drop_path_rate
    (linear over all blocks), ls_init_value (layer scale γ), att_head_dim (per stage head width of the
    linear attention), cls_dim (width of the final map = ``ratios[-1][1] · (feat + mem)[-1]``).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (2, 4, 8, 4),
        feat_dims: Sequence[int] = (24, 48, 96, 192),
        mem_dims: Sequence[int] = (8, 16, 32, 64),
        ratios: Sequence[Sequence[int]] = ((2, 2), (2, 4), (4, 4), (4, 4)),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ls_init_value: float = 1e-6,
        att_head_dim: Sequence[int] = (1, 1, 16, 32),
        cls_dim: int = 1024,
        global_pool: str = "avg",
    ):
        super().__init__()
        n = len(depths)
        for name, seq in dict(feat_dims=feat_dims, mem_dims=mem_dims, ratios=ratios, att_head_dim=att_head_dim).items():
            if len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries; depths has {n} stages")
        dims = tuple(f + m for f, m in zip(feat_dims, mem_dims))
        if ratios[-1][1] * dims[-1] != cls_dim:
            raise ValueError(f"cls_dim={cls_dim} must equal ratios[-1][1] * (feat_dims + mem_dims)[-1] = "
                             f"{ratios[-1][1] * dims[-1]} (the width of the last block's output)")
        for i, (g, d) in enumerate(zip(mem_dims, att_head_dim)):
            if i >= ATT_STAGE and g % d:
                raise ValueError(f"mem_dims[{i}]={g} must be a multiple of att_head_dim[{i}]={d}")
        _check_pool(global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.att_head_dim = tuple(att_head_dim)
        self.num_features = self.head_hidden_size = cls_dim
        self.global_pool = global_pool
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), nn.BatchNorm2d(dims[0]))
        dp_rates = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, prev, self.feature_info = [], dims[0], []
        for i in range(n):
            stages.append(CAREStage(prev, dims[i], ds_stride=2 if i > 0 else 1, depth=depths[i],
                                    drop_path_rates=dp_rates[i], ls_init_value=ls_init_value, act_layer=nn.GELU,
                                    ratio=ratios[i], if_att=i >= ATT_STAGE, att_head_dim=att_head_dim[i],
                                    mem_dim=mem_dims[i], last_stage=i == n - 1))
            out = cls_dim if i == n - 1 else dims[i]
            self.feature_info.append(dict(num_chs=out, reduction=4 * 2**i, module=f"stages.{i}"))
            prev = dims[i]
        self.stages = nn.Sequential(*stages)
        self.head = Head(cls_dim, num_classes, drop=drop_rate)
        self.dist_head = Head(cls_dim, num_classes, drop=drop_rate)
        self.distilled_training = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The official ``_init_weights``: ``Conv2d`` and ``Linear`` trunc_normal(0.02), zero bias."""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    # --- timm model contract -------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, return ``(head, dist_head)`` logits (the official training output)."""
        self.distilled_training = enable

    @torch.jit.ignore
    def get_classifier(self) -> Tuple[nn.Module, nn.Module]:
        return self.head.fc, self.dist_head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New ``fc`` layers in both heads (``nn.Identity`` for 0 classes: pooled features out)."""
        if global_pool is not None:
            _check_pool(global_pool)
        self.num_classes = num_classes
        for head in (self.head, self.dist_head):
            if num_classes > 0:
                w = head.norm.weight
                head.fc = nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype)
                self._init_weights(head.fc)
            else:
                head.fc = nn.Identity()

    # --- forward --------------------------------------------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        """Image ``(B, C, H, W)`` → final map ``(B, cls_dim, H/32, W/32)``."""
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Final map → the mean of both heads' logits (``pre_logits``: of their normalised features)."""
        if pre_logits:
            return (self.head.pre_logits(x) + self.dist_head.pre_logits(x)) / 2
        return (self.head(x) + self.dist_head(x)) / 2

    def forward(self, x: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        x = self.forward_features(x)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return self.head(x), self.dist_head(x)
        return self.forward_head(x)

    # --- intermediate features (features_only=True) ---------------------------------------------------

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Each stage's output map (``feature_info`` gives widths and strides). ``norm`` changes nothing: the
        model has no norm on its stage maps. Returns the list, or ``(forward_features output, list)``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = max_index if (stop_early or intermediates_only) else len(self.stages) - 1
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the stages after the last of ``indices``; with ``prune_head``, the heads too."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        self.num_features = self.head_hidden_size = self.feature_info[-1]["num_chs"]
        if prune_head:
            self.head = self.dist_head = None
            self.num_classes = 0
        return take_indices


def _check_pool(global_pool: str) -> None:
    if global_pool != "avg":
        raise ValueError(f"CARE Transformer's heads pool by averaging: global_pool must be 'avg', got {global_pool!r}")


# --- timm registration ---------------------------------------------------------------------------------


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: CARETransformer) -> Dict[str, Tensor]:
    """Official checkpoints (``{'model'|'state_dict': ...}``, ``module.`` prefixes) load as they are."""
    for key in ("model", "state_dict", "model_ema"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
            break
    return {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "", "hf_hub_id": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0", "classifier": ("head.fc", "dist_head.fc"),
        "paper_ids": "arXiv:2411.16170",
        "paper_name": "CARE Transformer: Mobile-Friendly Linear Visual Transformer via Decoupled Dual Interaction",
        "origin_url": "https://github.com/zhouyuan888888/CARE-Transformer",
        **kwargs,
    }  # fmt: skip


# The official checkpoints live on Google Drive (not a model hub): every cfg is the untrained architecture;
# load a downloaded file with pretrained=True, pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs({"care_s0": _cfg(), "care_s1": _cfg(), "care_s2": _cfg()})


def _create_care(variant: str, pretrained: bool, model_args: Dict[str, Any], kwargs: Dict[str, Any]) -> CARETransformer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        CARETransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **dict(model_args, **kwargs))


@register_model
def care_s0(pretrained: bool = False, **kwargs) -> CARETransformer:
    """CARE-S0 (official CARETrans_S0): dims 32-64-128-256, depths 2-4-8-4; 7.34M params, 0.72 GMACs."""
    args = dict(depths=(2, 4, 8, 4), feat_dims=(24, 48, 96, 192), mem_dims=(8, 16, 32, 64), cls_dim=1024,
                ratios=((2, 2), (2, 4), (4, 4), (4, 4)))
    return _create_care("care_s0", pretrained, args, kwargs)


@register_model
def care_s1(pretrained: bool = False, **kwargs) -> CARETransformer:
    """CARE-S1 (official CARETrans_S1): dims 32-64-128-256, depths 3-6-10-6; 9.60M params, 1.03 GMACs."""
    args = dict(depths=(3, 6, 10, 6), feat_dims=(24, 48, 96, 192), mem_dims=(8, 16, 32, 64), cls_dim=1024,
                ratios=((2, 4), (2, 4), (4, 4), (4, 4)))
    return _create_care("care_s1", pretrained, args, kwargs)


@register_model
def care_s2(pretrained: bool = False, **kwargs) -> CARETransformer:
    """CARE-S2 (official CARETrans_S2): dims 32-64-192-384, depths 3-6-10-6; 19.48M params, 1.92 GMACs."""
    args = dict(depths=(3, 6, 10, 6), feat_dims=(24, 48, 144, 288), mem_dims=(8, 16, 48, 96), cls_dim=1536,
                ratios=((4, 4), (4, 4), (4, 4), (4, 4)))
    return _create_care("care_s2", pretrained, args, kwargs)
