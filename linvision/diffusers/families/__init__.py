"""The diffusers denoiser families, one :class:`~.base.Family` object each, and their registry.

| family          | class                        | replaced attentions                               | kind   | grid rule |
|-----------------|------------------------------|---------------------------------------------------|--------|-----------|
| ``unet``        | ``UNet2DConditionModel``     | every ``…attn1`` (self-attention; ``attn2`` kept) | self   | halving   |
| ``dit``         | ``DiTTransformer2DModel``    | every ``…attn1``                                  | self   | patch     |
| ``pixart``      | ``PixArtTransformer2DModel`` | every ``…attn1`` (cross-attention ``attn2`` kept) | self   | patch     |
| ``sana``        | ``SanaTransformer2DModel``   | every ``…attn1`` (ReLU linear; ``attn2`` kept)    | self   | patch     |
| ``sd3``         | ``SD3Transformer2DModel``    | every joint ``…attn`` and SD3.5's ``…attn2``      | joint  | patch     |
| ``flux``        | ``FluxTransformer2DModel``   | every ``FluxAttention`` (dual and single blocks)  | joint  | ids       |
| ``linvision_dit``| ``LinVisionDiT``            | none: the student is a whole model, another mixer | model  | patch     |

*self*: the module is swapped for a shell around a linvision mixer (LinFusion's way; IP-Adapter and
ControlNet, which touch ``attn2`` and the residuals, keep working). *joint*: text tokens are prefix tokens;
the image-stream projections are swapped for the adapter's and the processor for the adapter's, while
the text projections, QK norms and RoPE stay the teacher's. *model*: linvision's own DiT runs linvision
mixers already; its student (:class:`~.linvision_dit.MixerStudent`) is a ``LinVisionDiT`` with another mixer.

Adding a family is one file: a :class:`~.base.Family` subclass and its instance in :data:`FAMILIES`.
"""
from __future__ import annotations

from typing import Tuple

from .base import KINDS, Family, denoiser_of, vae_scale_factor
from .conditioner import Condition, Conditioner, LabelConditioner, unwrap
from .dit import DIT
from .flux import FLUX
from .linvision_dit import LINVISION_DIT, MixerStudent
from .pixart import PIXART
from .sana import SANA
from .sd3 import SD3
from .unet import UNET

FAMILIES: Tuple[Family, ...] = (UNET, DIT, PIXART, SANA, SD3, FLUX, LINVISION_DIT)


def family_named(name: str) -> Family:
    """The family called ``name``; ``ValueError`` listing the names otherwise."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown family {name!r}; expected one of {', '.join(f.name for f in FAMILIES)}")


def family_of(pipe_or_denoiser) -> Family:
    """The :class:`Family` of a denoiser (or a pipeline's); ``ValueError`` naming the supported classes otherwise."""
    denoiser = denoiser_of(pipe_or_denoiser)
    for family in FAMILIES:
        if family.matches(denoiser):
            return family
    raise ValueError(f"unsupported denoiser {type(denoiser).__name__}; supported: "
                     f"{', '.join(c for f in FAMILIES for c in f.class_names)}")


__all__ = ["Condition", "Conditioner", "DIT", "FAMILIES", "FLUX", "Family", "KINDS", "LINVISION_DIT", "LabelConditioner",
           "MixerStudent", "PIXART", "SANA", "SD3", "UNET", "denoiser_of", "family_named", "family_of",
           "unwrap", "vae_scale_factor"]
