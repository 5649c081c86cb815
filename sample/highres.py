"""High-resolution recipes: progressive SDEdit upscaling with latent reuse, and FLUX's NTK-scaled RoPE.

Stage 0 draws at a base size; each later stage upsamples the previous result, re-noises it to
``strength`` of the schedule and denoises the rest at the larger size (SDEdit). The previous result
is either the **latent** (upsampled bicubically in latent space: LinFusion's progressive pipelines reuse
the low-resolution latent) or the decoded **image** (upsampled, re-encoded by the VAE: CLEAR's notebook).
For FLUX, CLEAR also multiplies RoPE's θ by ``ntk_factor`` during the upscaling stages.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from linvision.diffusers.families.flux import unpack_flux_latents  # noqa: F401  (FLUX's, re-exported)


def stage_sizes(base: Tuple[int, int], final: Tuple[int, int], stages: int, stride: int) -> List[Tuple[int, int]]:
    """``stages + 1`` sizes from ``base`` to ``final``, geometric in between, each a multiple of ``stride``."""
    (bh, bw), (fh, fw) = base, final
    sizes = []
    for s in range(stages + 1):
        t = s / stages
        h = max(stride, round(bh * (fh / bh) ** t / stride) * stride)
        w = max(stride, round(bw * (fw / bw) ** t / stride) * stride)
        sizes.append((h, w))
    sizes[-1] = (fh, fw)
    return sizes


def default_base(final: Tuple[int, int], stages: int, stride: int) -> Tuple[int, int]:
    """``final / 2**stages`` per side, rounded to the stride (at least one stride)."""
    return tuple(max(stride, round(s / 2**stages / stride) * stride) for s in final)


def upsample_latents(latents: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bicubic upsampling of ``(B, C, h, w)`` latents to ``size``, computed in fp32."""
    return F.interpolate(latents.float(), size=size, mode="bicubic", align_corners=False).to(latents.dtype)


@contextlib.contextmanager
def ntk_rope(transformer: nn.Module, factor: float) -> Iterator[None]:
    """Within the block, FLUX's RoPE uses ``θ·factor`` (CLEAR's ``ntk_factor``; diffusers'
    ``get_1d_rotary_pos_embed(ntk_factor=…)`` multiplies θ the same way). No-op for other denoisers."""
    pos_embed = getattr(transformer, "pos_embed", None)
    if factor == 1.0 or pos_embed is None or not hasattr(pos_embed, "theta") or not hasattr(pos_embed, "axes_dim"):
        yield
        return
    theta = pos_embed.theta
    pos_embed.theta = theta * factor
    try:
        yield
    finally:
        pos_embed.theta = theta


def sdedit_steps(steps: int, strength: float) -> int:
    """Denoising steps an SDEdit stage runs (diffusers' img2img rule)."""
    return min(max(int(steps * strength), 1), steps)


__all__ = ["default_base", "ntk_rope", "sdedit_steps", "stage_sizes", "unpack_flux_latents", "upsample_latents"]
