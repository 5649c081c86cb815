"""InfViT: the 4-layer ViT of the Infinite Self-Attention paper, as far as the paper defines it.

Paper: Roffo & Palmer, "Self-Attention And Beyond the Infinite: Towards Linear Transformers with Infinite
Self-Attention" (arXiv 2603.00175, v1 "Infinite Self-Attention"). Official code
``giorgioroffo/infinite-self-attention`` at ``4a37fc0`` ships the attention (``infsa/attention.py::
InfSAAttention``) but **not** the InfViT model, its config or its training scripts.

What the paper and README state: a standard ViT with **4 layers**, every attention replaced by InfSA,
224² input, the DeiT recipe without distillation; "Linear InfViT 4L" 53.5M params / 59 GFLOPs / 84.7% top-1,
"Pure InfViT 4L" 57.7M / 59 GFLOPs / 85.1%, against a "Standard ViT 4L" 57.7M / 17.5 GFLOPs / 81.5%.
Width, heads, MLP ratio and patch size are not given, and the numbers do not determine them (an attention
swap changes neither parameters nor FLOPs, yet the table differs in both).

What is built here (linvision's ViT, :class:`linvision.models.LinVisionTransformer`, with the ``infsa``
mixer in every block): patch 16, **width 1024, 16 heads, MLP ratio 4** (ViT-L's width — the 4.2M gap between
the linear and pure rows equals 4·1024², one 1024² matrix per layer), class-token pooling, timm's ViT
init. That gives 52.4M parameters at 1000 classes (−2.1% against 53.5M) and 9.3 GMACs at 224² in linear
mode (torch's FlopCounter; about 18.5 GFLOPs, near the table's ViT row, far from its 59). Treat it as
the paper's layout at a documented width, not as a reproduction of its numbers; change ``embed_dim``,
``num_heads``, ``depth`` and ``mlp_ratio`` freely.

>>> import linvision, timm
>>> m = timm.create_model("infvit_4l_patch16_224")                    # Linear InfViT (rank-1 linear InfSA)
>>> m = timm.create_model("infvit_pure_4l_patch16_224")               # Pure InfViT (quadratic InfSA)
>>> m = timm.create_model("infvit_4l_patch16_224", mixer=["infsa"] * 3 + ["softmax"])   # 3 : 1 hybrid
>>> m = timm.create_model("infvit_4l_patch16_224", mixer_kwargs={"infsa": {"per_token": True}})

The mixer's semantics and its deviations from upstream (constant ρ without ``.item()``, the rank-1 output of
linear mode, ``per_token`` as the fix) are documented in :mod:`linvision.mixers.infsa`.
"""
from __future__ import annotations

from typing import Any, Dict

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import checkpoint_filter_fn

from .vit import LinVisionTransformer

__all__ = ["default_cfgs"]  # register_model appends the entry points

INFVIT_ARGS = dict(patch_size=16, embed_dim=1024, depth=4, num_heads=16, mlp_ratio=4.0, mixer="infsa")


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "",
        "hf_hub_id": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2603.00175",
        "paper_name": "Self-Attention And Beyond the Infinite: Towards Linear Transformers with Infinite Self-Attention",
        "origin_url": "https://github.com/giorgioroffo/infinite-self-attention",
        **kwargs,
    }


# No weights are published upstream: every cfg is the untrained architecture.
default_cfgs = generate_default_cfgs({"infvit_4l_patch16_224": _cfg(), "infvit_pure_4l_patch16_224": _cfg()})


def _create_infvit(variant: str, pretrained: bool, mode: str, kwargs: Dict[str, Any]) -> LinVisionTransformer:
    """InfViT with ``infsa`` layers in ``mode`` unless ``mixer_kwargs`` sets the mode itself."""
    mixer_kwargs = dict(kwargs.pop("mixer_kwargs", None) or {})
    if "mode" not in mixer_kwargs:  # a shared "mode" key is the user's choice for every layer
        own = dict(mixer_kwargs.get("infsa") or {})
        own.setdefault("mode", mode)
        mixer_kwargs["infsa"] = own
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        LinVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(INFVIT_ARGS, mixer_kwargs=mixer_kwargs, **kwargs),
    )


@register_model
def infvit_4l_patch16_224(pretrained: bool = False, **kwargs) -> LinVisionTransformer:
    """Linear InfViT 4L: 4 ViT blocks (1024 wide, 16 heads, patch 16) with linear InfSA; 52.4M params."""
    return _create_infvit("infvit_4l_patch16_224", pretrained, "linear", kwargs)


@register_model
def infvit_pure_4l_patch16_224(pretrained: bool = False, **kwargs) -> LinVisionTransformer:
    """Pure InfViT 4L: as ``infvit_4l_patch16_224`` with the quadratic (pure) InfSA operator; 52.4M params."""
    return _create_infvit("infvit_pure_4l_patch16_224", pretrained, "quadratic", kwargs)
