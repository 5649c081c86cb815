"""The ``unet`` family: ``UNet2DConditionModel`` (SD 1.5/2.1, SDXL).

Replaced: every self-attention ``…attn1`` (``attn2``, the cross-attention, is kept, so IP-Adapter and ControlNet
keep working). Geometry ``halving``: level ``l`` of the latent ``(H, W)`` is ``(⌈H/2^l⌉, ⌈W/2^l⌉)``; latent
stride = the VAE factor (the UNet pads odd levels itself). Conditions: ``prompt_embeds (B, L, C)`` [+
``pooled_prompt_embeds (B, P)`` for SDXL, whose ``time_ids`` come from the latent size].
"""
from __future__ import annotations

import torch

from .base import Family, random_inputs
from .conditioner import Conditioner
from .tiny import in_eval_mode, tiny_clip_tokenizer, tiny_vae


class UNetConditioner(Conditioner):
    """SD 1.5/2.1 (``prompt_embeds``) and SDXL (``+ pooled_prompt_embeds``; ``time_ids`` from the size)."""

    def _xl(self) -> bool:
        return getattr(self.pipe.unet.config, "addition_embed_type", None) == "text_time"

    def _encode(self, prompts, device):
        if self._xl():
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        embeds, _ = self.pipe.encode_prompt(prompts, device, 1, False)
        return {"prompt_embeds": embeds}

    def call(self, denoiser, x, t, cond):
        extra = {}
        if "pooled_prompt_embeds" in cond:
            H, W = (s * self.vae_scale_factor for s in x.shape[-2:])
            time_ids = torch.tensor([H, W, 0, 0, H, W], device=x.device, dtype=x.dtype).expand(x.shape[0], 6)
            extra["added_cond_kwargs"] = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": time_ids}
        return denoiser(x, t, encoder_hidden_states=cond["prompt_embeds"], **extra).sample


class UNetFamily(Family):
    name = "unet"
    class_names = ("UNet2DConditionModel",)
    rule = "halving"

    def classes(self):
        from diffusers import UNet2DConditionModel

        return (UNet2DConditionModel,)

    def conditioner(self, pipe, max_sequence_length=None):
        return UNetConditioner(self, pipe, max_sequence_length)

    def tiny_pipeline(self, tokenizer_folder=None):
        """Tiny SD (2 levels of 4/8 channels, DDIM); with ``tokenizer_folder``, a tiny CLIP text encoder and
        letter tokenizer."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=8, norm_num_groups=2,
        )
        text_encoder = tokenizer = None
        if tokenizer_folder is not None:
            from transformers import CLIPTextConfig, CLIPTextModel

            text_encoder = CLIPTextModel(CLIPTextConfig(
                hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2, vocab_size=1000,
                bos_token_id=0, eos_token_id=2, pad_token_id=1))
            tokenizer = tiny_clip_tokenizer(tokenizer_folder)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
        return in_eval_mode(StableDiffusionPipeline(
            vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        ))

    def random_denoiser(self, width, depth, heads):
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        return UNet2DConditionModel(block_out_channels=(width // 2, width), layers_per_block=1, sample_size=32,
                                    in_channels=4, out_channels=4, cross_attention_dim=64, attention_head_dim=heads,
                                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8).eval()

    def example_inputs(self, model, size, batch=2, text=16):
        rand, t = random_inputs(model)
        return {"sample": rand(batch, 4, size, size), "timestep": t(batch), "encoder_hidden_states": rand(batch, text, 64)}


UNET = UNetFamily()

__all__ = ["UNET", "UNetConditioner", "UNetFamily"]
