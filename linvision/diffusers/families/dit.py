"""The ``dit`` family: diffusers' ``DiTTransformer2DModel`` (class-conditional, ``DiTPipeline``).

Replaced: every ``…attn1``. Geometry ``patch``: one level, ``(H/p, W/p)``; latent stride = VAE factor × patch.
Conditions: ``class_labels (B,)`` int64 (the null class, for CFG, is ``num_embeds_ada_norm``). Sampled square
only (diffusers unpatchifies a square grid), through ``linvision.sample.dit.sample_dit``.
"""
from __future__ import annotations

import torch

from .base import Family, class_conditional_inputs
from .conditioner import LabelConditioner
from .tiny import in_eval_mode, tiny_vae


def dit_transformer(*, sample_size: int = 4, num_layers: int = 2, patch_size: int = 2, num_attention_heads: int = 2,
                    attention_head_dim: int = 8):
    """The one builder of a small ``DiTTransformer2DModel``: 4 latent channels in, ε and learned sigma out
    (8 channels), 1000 classes + the null class, adaLN-Zero, attention bias, tanh-GELU; ``sample_size`` latent
    pixels a side, ``(sample_size / patch_size)²`` tokens of ``num_attention_heads · attention_head_dim``
    channels through ``num_layers`` blocks. Called as ``model(latents (B, 4, S, S), timestep (B,),
    class_labels (B,)).sample -> (B, 8, S, S)``.

    Random init from torch's global generator (callers seed it), in train mode. The defaults are the tiny
    pipeline's denoiser; the benchmarks, the digits teacher and the tests pass their own sizes.
    """
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        sample_size=sample_size, num_layers=num_layers, patch_size=patch_size, attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads, in_channels=4, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        norm_elementwise_affine=False)


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
        from diffusers import DDIMScheduler, DiTPipeline

        torch.manual_seed(seed)
        transformer = dit_transformer()
        return in_eval_mode(DiTPipeline(transformer=transformer, vae=tiny_vae(blocks=4),
                                        scheduler=DDIMScheduler(steps_offset=1)))

    def random_denoiser(self, width, depth, heads):
        torch.manual_seed(0)
        return dit_transformer(sample_size=32, num_layers=depth, num_attention_heads=heads,
                               attention_head_dim=width // heads).eval()

    def example_inputs(self, model, size, batch=2, text=16):
        return class_conditional_inputs(model, size, batch)


DIT = DiTFamily()

__all__ = ["DIT", "DiTFamily", "dit_transformer"]
