"""The ``pixart`` family: ``PixArtTransformer2DModel`` (PixArt-α/Σ).

Replaced: every ``…attn1`` (the cross-attention ``attn2`` is kept). Geometry ``patch``. Conditions:
``prompt_embeds (B, L, C)``, ``prompt_attention_mask (B, L)`` from ``pipe.encode_prompt`` (T5); the resolution
conditions of PixArt-α are derived from the latent size.
"""
from __future__ import annotations

import torch

from .base import Family, random_inputs
from .conditioner import Conditioner, unwrap
from .tiny import in_eval_mode, tiny_vae


def masked_text_kwargs(cond, null, guidance):
    """Pipeline kwargs of the masked-text families (PixArt, SANA): embeddings and masks, negatives for CFG."""
    kwargs = {"prompt_embeds": cond["prompt_embeds"], "prompt_attention_mask": cond["prompt_attention_mask"],
              "negative_prompt": None, "use_resolution_binning": False}
    if guidance > 1 and null is not None:
        n = cond["prompt_embeds"].shape[0]
        kwargs["negative_prompt_embeds"] = null["prompt_embeds"].expand(n, *null["prompt_embeds"].shape[1:])
        kwargs["negative_prompt_attention_mask"] = null["prompt_attention_mask"].expand(
            n, *null["prompt_attention_mask"].shape[1:])
    return kwargs


class PixArtConditioner(Conditioner):
    def _encode(self, prompts, device):
        embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                     **self._text_kwargs())
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def call(self, denoiser, x, t, cond):
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(unwrap(denoiser), "use_additional_conditions", False):
            H, W = (s * self.vae_scale_factor for s in x.shape[-2:])
            added = {"resolution": torch.tensor([[H, W]], device=x.device, dtype=x.dtype).expand(x.shape[0], 2),
                     "aspect_ratio": torch.tensor([[H / W]], device=x.device, dtype=x.dtype).expand(x.shape[0], 1)}
        return denoiser(x, encoder_hidden_states=cond["prompt_embeds"],
                        encoder_attention_mask=cond["prompt_attention_mask"], timestep=t,
                        added_cond_kwargs=added).sample

    def pipeline_kwargs(self, cond, null, guidance):
        return masked_text_kwargs(cond, null, guidance)


class PixArtFamily(Family):
    name = "pixart"
    class_names = ("PixArtTransformer2DModel",)

    def classes(self):
        from diffusers import PixArtTransformer2DModel

        return (PixArtTransformer2DModel,)

    def conditioner(self, pipe, max_sequence_length=None):
        return PixArtConditioner(self, pipe, max_sequence_length)

    def tiny_pipeline(self):
        """Tiny PixArt-α: 2 blocks of 16 channels, patch 2, 32-channel captions, no text encoder, DDIM."""
        from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

        torch.manual_seed(0)
        transformer = PixArtTransformer2DModel(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
            in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        )
        return in_eval_mode(PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(),
                                                transformer=transformer, scheduler=DDIMScheduler(steps_offset=1)))

    def random_denoiser(self, width, depth, heads):
        from diffusers import PixArtTransformer2DModel

        torch.manual_seed(0)
        return PixArtTransformer2DModel(sample_size=32, num_layers=depth, patch_size=2, attention_head_dim=width // heads,
                                        num_attention_heads=heads, caption_channels=64, in_channels=4,
                                        cross_attention_dim=width, out_channels=8, norm_type="ada_norm_single",
                                        norm_elementwise_affine=False, num_embeds_ada_norm=1000).eval()

    def example_inputs(self, model, size, batch=2, text=16):
        rand, t = random_inputs(model)
        return {"hidden_states": rand(batch, 4, size, size), "encoder_hidden_states": rand(batch, text, 64),
                "timestep": t(batch), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


PIXART = PixArtFamily()

__all__ = ["PIXART", "PixArtConditioner", "PixArtFamily", "masked_text_kwargs"]
