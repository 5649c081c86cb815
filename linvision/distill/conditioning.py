"""How each denoiser family is conditioned and called during distillation: the family's own
:class:`~linvision.diffusers.families.Conditioner` (in its file under :mod:`linvision.diffusers.families`).

A *condition* is a dict of per-sample tensors with a leading batch dimension, the same for teacher and
student (so they always see identical inputs):

| family        | condition keys                                                       | from                          |
|---------------|----------------------------------------------------------------------|-------------------------------|
| dit           | ``class_labels (B,)`` int64 (the null class, for CFG, is ``num_embeds_ada_norm``) | labels           |
| linvision_dit | ``class_labels (B,)`` int64 (the null class is ``num_classes``)       | labels                        |
| unet          | ``prompt_embeds (B, L, C)`` [+ ``pooled_prompt_embeds (B, P)`` for SDXL] | ``pipe.encode_prompt``     |
| pixart        | ``prompt_embeds (B, L, C)``, ``prompt_attention_mask (B, L)``          | ``pipe.encode_prompt``        |
| sana          | ``prompt_embeds (B, L, C)``, ``prompt_attention_mask (B, L)``          | ``pipe.encode_prompt`` (Gemma, with the pipeline's complex human instruction) |
| sd3           | ``prompt_embeds (B, L, C)``, ``pooled_prompt_embeds (B, P)``           | ``pipe.encode_prompt``        |
| flux          | ``prompt_embeds (B, L, C)``, ``pooled_prompt_embeds (B, P)``           | ``pipe.encode_prompt``        |

:meth:`Conditioner.call` runs a denoiser on latents ``x (B, C, H, W)`` at timesteps ``t (B,)`` and
returns its prediction in the latent layout ``(B, C_out, H, W)`` (FLUX's 2×2 packing and ids are done
there; SDXL's ``time_ids`` and PixArt's resolution conditions are derived from the latent size).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..diffusers.families import Condition, Conditioner, family_of, unwrap
from ..diffusers.families.flux import FLUX_GUIDANCE, flux_image_ids, pack_flux, unpack_flux


def conditioner_for(pipe, max_sequence_length: Optional[int] = None) -> Conditioner:
    """The :class:`Conditioner` of ``pipe``'s denoiser family."""
    return family_of(pipe).conditioner(pipe, max_sequence_length)


def select(cond: Condition, index) -> Condition:
    """Rows ``index`` of every tensor of ``cond``."""
    return {k: v[index] for k, v in cond.items()}


def concat(conds: Sequence[Condition]) -> Condition:
    """Conditions stacked along the batch."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def to(cond: Condition, device, dtype=None) -> Condition:
    """``cond`` on ``device``; floating tensors cast to ``dtype`` when given (ids and masks keep theirs)."""
    return {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
            for k, v in cond.items()}


__all__ = ["Condition", "Conditioner", "FLUX_GUIDANCE", "concat", "conditioner_for", "flux_image_ids", "pack_flux",
           "select", "to", "unpack_flux", "unwrap"]
