"""The ``sd3`` family: ``SD3Transformer2DModel`` (SD3/SD3.5, joint attention).

Replaced: every joint ``…attn`` of the transformer blocks and SD3.5's ``…attn2`` (kind ``joint``: text tokens are
prefix tokens; the image-stream projections and the processor are swapped). Geometry ``patch``. Conditions:
``prompt_embeds (B, L, C)``, ``pooled_prompt_embeds (B, P)`` from ``pipe.encode_prompt``.
"""
from __future__ import annotations

import torch

from .base import Family, random_inputs
from .conditioner import Conditioner


class SD3Conditioner(Conditioner):
    def _encode(self, prompts, device):
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=device,
                                                       do_classifier_free_guidance=False, **self._text_kwargs())
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def call(self, denoiser, x, t, cond):
        return denoiser(hidden_states=x, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                        pooled_projections=cond["pooled_prompt_embeds"]).sample


class SD3Family(Family):
    name = "sd3"
    class_names = ("SD3Transformer2DModel",)
    kind = "joint"

    def classes(self):
        from diffusers import SD3Transformer2DModel

        return (SD3Transformer2DModel,)

    def is_target(self, name, module):
        from diffusers.models.attention_processor import Attention

        return (isinstance(module, Attention) and name.rsplit(".", 1)[-1] in ("attn", "attn2")
                and ".transformer_blocks." in f".{name}")

    def conditioner(self, pipe, max_sequence_length=None):
        return SD3Conditioner(self, pipe, max_sequence_length)

    def tiny_pipeline(self):
        """Tiny SD3.5-like: 2 blocks (one dual-attention), patch 1, RMS QK norms, flow matching, no text encoders."""
        from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                               StableDiffusion3Pipeline)

        from .tiny import in_eval_mode

        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=16, out_channels=4,
            pos_embed_max_size=64, dual_attention_layers=(0,), qk_norm="rms_norm",
        )
        vae = AutoencoderKL(block_out_channels=[4, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2,
                            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5)
        return in_eval_mode(StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
            tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        ))

    def random_denoiser(self, width, depth, heads):
        from diffusers import SD3Transformer2DModel

        torch.manual_seed(0)
        return SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=depth,
                                     attention_head_dim=width // heads, num_attention_heads=heads, joint_attention_dim=64,
                                     caption_projection_dim=width, pooled_projection_dim=64, out_channels=4,
                                     pos_embed_max_size=256).eval()

    def example_inputs(self, model, size, batch=2, text=16):
        rand, t = random_inputs(model)
        return {"hidden_states": rand(batch, 4, size, size), "encoder_hidden_states": rand(batch, text, 64),
                "pooled_projections": rand(batch, 64), "timestep": t(batch)}


SD3 = SD3Family()

__all__ = ["SD3", "SD3Conditioner", "SD3Family"]
