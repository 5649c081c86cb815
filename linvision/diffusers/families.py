"""Which diffusers denoisers an adapter supports, and which of their attentions it replaces.

| family   | class                        | replaced attentions                               | kind   | grid rule |
|----------|------------------------------|---------------------------------------------------|--------|-----------|
| ``unet`` | ``UNet2DConditionModel``     | every ``…attn1`` (self-attention; ``attn2`` kept) | self   | halving   |
| ``dit``  | ``DiTTransformer2DModel``    | every ``…attn1``                                  | self   | patch     |
| ``pixart``| ``PixArtTransformer2DModel``| every ``…attn1`` (cross-attention ``attn2`` kept) | self   | patch     |
| ``sana`` | ``SanaTransformer2DModel``   | every ``…attn1`` (ReLU linear; ``attn2`` kept)    | self   | patch     |
| ``sd3``  | ``SD3Transformer2DModel``    | every joint ``…attn`` and SD3.5's ``…attn2``      | joint  | patch     |
| ``flux`` | ``FluxTransformer2DModel``   | every ``FluxAttention`` (dual and single blocks)  | joint  | ids       |

*self*: the module is swapped for a shell around a linvision mixer (LinFusion's way; IP-Adapter and
ControlNet, which touch ``attn2`` and the residuals, keep working). *joint*: text tokens are prefix tokens;
the image-stream projections are swapped for the adapter's and the processor for the adapter's, while
the text projections, QK norms and RoPE stay the teacher's.

linvision's own :class:`~linvision.models.dit.LinVisionDiT` (a ``DiTPipeline`` transformer trained from
scratch) counts as the ``dit`` family, so ``linvision sample`` draws with it; it runs linvision mixers
already, so it has no diffusers attention for an adapter to replace (``ValueError``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    class_name: str
    kind: str  # "self" | "joint"
    rule: str  # LatentGeometry rule


FAMILIES = (
    Family("unet", "UNet2DConditionModel", "self", "halving"),
    Family("dit", "DiTTransformer2DModel", "self", "patch"),
    Family("pixart", "PixArtTransformer2DModel", "self", "patch"),
    Family("sana", "SanaTransformer2DModel", "self", "patch"),
    Family("sd3", "SD3Transformer2DModel", "joint", "patch"),
    Family("flux", "FluxTransformer2DModel", "joint", "ids"),
)


def _classes():
    from diffusers import (
        DiTTransformer2DModel,
        FluxTransformer2DModel,
        PixArtTransformer2DModel,
        SanaTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    from ..models.dit import LinVisionDiT

    return {
        "UNet2DConditionModel": UNet2DConditionModel,
        "DiTTransformer2DModel": (DiTTransformer2DModel, LinVisionDiT),
        "PixArtTransformer2DModel": PixArtTransformer2DModel,
        "SanaTransformer2DModel": SanaTransformer2DModel,
        "SD3Transformer2DModel": SD3Transformer2DModel,
        "FluxTransformer2DModel": FluxTransformer2DModel,
    }


def denoiser_of(pipe_or_denoiser) -> nn.Module:
    """The denoiser of a pipeline (``pipe.unet`` or ``pipe.transformer``), or the argument itself if a model."""
    if isinstance(pipe_or_denoiser, nn.Module):
        return pipe_or_denoiser
    for name in ("unet", "transformer"):
        model = getattr(pipe_or_denoiser, name, None)
        if isinstance(model, nn.Module):
            return model
    raise ValueError(f"{type(pipe_or_denoiser).__name__} has no unet or transformer denoiser")


def family_of(denoiser: nn.Module) -> Family:
    """The :class:`Family` of ``denoiser``; ``ValueError`` naming the supported classes otherwise."""
    classes = _classes()
    for family in FAMILIES:
        if isinstance(denoiser, classes[family.class_name]):
            return family
    raise ValueError(
        f"unsupported denoiser {type(denoiser).__name__}; supported: {', '.join(f.class_name for f in FAMILIES)}"
    )


def patch_size_of(denoiser: nn.Module, family: Family) -> int:
    if family.rule != "patch":
        return 1
    return int(denoiser.config.patch_size)


def target_attentions(denoiser: nn.Module, family: Family) -> List[Tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every attention the adapter replaces, in ``named_modules`` order."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_flux import FluxAttention

    from .joint import JointProcessor
    from .self_attention import SelfAttentionShell

    found = []
    for name, module in denoiser.named_modules():
        if isinstance(module, SelfAttentionShell) or isinstance(getattr(module, "processor", None), JointProcessor):
            raise ValueError(f"{name} already runs a linvision adapter; uninstall it first")
        leaf = name.rsplit(".", 1)[-1]
        if family.name == "flux":
            if isinstance(module, FluxAttention):
                found.append((name, module))
        elif family.name == "sd3":
            if isinstance(module, Attention) and leaf in ("attn", "attn2") and ".transformer_blocks." in f".{name}":
                found.append((name, module))
        elif isinstance(module, Attention) and leaf == "attn1" and not module.is_cross_attention:
            found.append((name, module))
    if not found:
        raise ValueError(f"found no attention to replace in {type(denoiser).__name__}")
    return found


__all__ = ["FAMILIES", "Family", "denoiser_of", "family_of", "patch_size_of", "target_attentions"]
