"""The ``dit`` family: diffusers' ``DiTTransformer2DModel`` (class-conditional, ``DiTPipeline``).

Replaced: every ``…attn1``. Geometry ``patch``: one level, ``(H/p, W/p)``; latent stride = VAE factor × patch.
Conditions: ``class_labels (B,)`` int64 (the null class, for CFG, is ``num_embeds_ada_norm``). Sampled square
only (diffusers unpatchifies a square grid), through ``linvision.sample.dit.sample_dit``.
"""
from __future__ import annotations

import torch

from .base import Family, random_inputs
from .conditioner import LabelConditioner
from .tiny import in_eval_mode, tiny_vae


class DiTFamily(Family):
    name = "dit"
    class_names = ("DiTTransformer2DModel",)
    text = False
    square_only = True

    def classes(self):
        from diffusers import DiTTransformer2DModel

        return (DiTTransformer2DModel,)

    def conditioner(self, pipe, max_sequence_length=None):
        return LabelConditioner(self, pipe, max_sequence_length)

    def null_class(self, denoiser) -> int:
        """DiT's unconditional class id (diffusers' ``LabelEmbedding`` keeps row ``num_classes`` for it)."""
        return int(denoiser.config.num_embeds_ada_norm)

    def tiny_pipeline(self, seed: int = 0):
        """A ``DiTPipeline``: 2 blocks of 16 channels (patch 2, learned sigma), a 4-level 4…8-channel VAE
        (factor 8, as DiTPipeline assumes), DDIM; latent stride 16, "training" resolution 32 px."""
        from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

        torch.manual_seed(seed)
        transformer = DiTTransformer2DModel(
            sample_size=4, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
            out_channels=8, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_zero", norm_elementwise_affine=False,
        )
        return in_eval_mode(DiTPipeline(transformer=transformer, vae=tiny_vae(blocks=4),
                                        scheduler=DDIMScheduler(steps_offset=1)))

    def random_denoiser(self, width, depth, heads):
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        return DiTTransformer2DModel(sample_size=32, num_layers=depth, patch_size=2, attention_head_dim=width // heads,
                                     num_attention_heads=heads, in_channels=4, out_channels=8,
                                     norm_type="ada_norm_zero").eval()

    def example_inputs(self, model, size, batch=2, text=16):
        rand, t = random_inputs(model)
        return {"hidden_states": rand(batch, 4, size, size), "timestep": t(batch),
                "class_labels": torch.arange(batch, device=next(model.parameters()).device)}


DIT = DiTFamily()

__all__ = ["DIT", "DiTFamily"]
