"""LION's named ViTs in timm: ``lion_vit_{tiny,small,base}_patch16_224`` (LION-🔥 / LION-D / LION-S via ``mask_type``).

Paper: Afzal et al., "Linear Attention for Efficient Bidirectional Sequence Modeling", arXiv 2502.16249. Official
code: ``LIONS-EPFL/LION`` at ``32a0136``, ``img_classification/lion/models_lion.py::lion_{tiny,small,base}_patch16_224``
(DeiT's ViT with ``Lion_Attention``: patch 16, MLP ratio 4, ``qkv_bias=True``, LayerNorm eps 1e-6, class token and
absolute position embedding, ``trunc_normal(0.02)`` init). The README gives 5M / 22M / 86M parameters.

Built on :class:`linvision.models.vit.LinVisionTransformer` with ``mixer="lion"``; ``mask_type`` (default
``"Selective"``, LION-S) and the other mixer options pass through ``mixer_kwargs``.
Deviation: LION pools the mean of all tokens after the final norm (its default ``cls_tok=False``), class token
included; here ``global_pool="avg"`` averages the patch tokens only.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import checkpoint_filter_fn

from .vit import LinVisionTransformer, _cfg

SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}

default_cfgs = generate_default_cfgs({f"lion_vit_{s}_patch16_224": _cfg() for s in SIZES})


def _create_lion_vit(size: str, pretrained: bool = False, mask_type: str = "Selective", **kwargs) -> LinVisionTransformer:
    embed_dim, num_heads = SIZES[size]
    mixer_kwargs = dict(kwargs.pop("mixer_kwargs", None) or {})
    mixer_kwargs.setdefault("mask_type", mask_type)
    args = dict(patch_size=16, embed_dim=embed_dim, depth=12, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True,
                mixer="lion", mixer_kwargs=mixer_kwargs, global_pool="avg", fc_norm=False)
    return build_model_with_cfg(LinVisionTransformer, f"lion_vit_{size}_patch16_224", pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **dict(args, **kwargs))


@register_model
def lion_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> LinVisionTransformer:
    """LION ViT-T/16 (192 dim, 12 blocks, 3 heads); ``mask_type`` "Lit" | "Decay" | "Selective"."""
    return _create_lion_vit("tiny", pretrained, **kwargs)


@register_model
def lion_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> LinVisionTransformer:
    """LION ViT-S/16 (384 dim, 12 blocks, 6 heads); ``mask_type`` "Lit" | "Decay" | "Selective"."""
    return _create_lion_vit("small", pretrained, **kwargs)


@register_model
def lion_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> LinVisionTransformer:
    """LION ViT-B/16 (768 dim, 12 blocks, 12 heads); ``mask_type`` "Lit" | "Decay" | "Selective"."""
    return _create_lion_vit("base", pretrained, **kwargs)
