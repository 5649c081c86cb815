"""The ``sana`` family: ``SanaTransformer2DModel`` (NVlabs SANA, ``SanaPipeline``).

Replaced: every ``…attn1`` (ReLU linear self-attention; the cross-attention ``attn2`` is kept). Geometry
``patch`` (patch 1 on a DC-AE's 32× latents). Conditions: ``prompt_embeds (B, L, C)``,
``prompt_attention_mask (B, L)`` from ``pipe.encode_prompt`` (Gemma, with the pipeline's complex human
instruction).
"""
from __future__ import annotations

import inspect

import torch

from .base import Family, random_inputs
from .conditioner import Conditioner, unwrap
from .pixart import masked_text_kwargs
from .tiny import in_eval_mode, tiny_gemma_tokenizer


class SanaConditioner(Conditioner):
    """SANA (``SanaPipeline``): Gemma-2 embeddings and mask like PixArt's T5 ones; ``timestep`` scaled by the
    model's ``timestep_scale`` as the pipeline does; no resolution conditions. Prompts are encoded with the
    pipeline's default ``complex_human_instruction`` (what ``SanaPipeline.__call__`` prepends), so the student
    trains on the conditions the pipeline samples with. SANA-Sprint (``guidance_embeds``, SCM timesteps) is
    refused: its few-step sampler is not the flow-matching pipeline this conditioner calls."""

    def __init__(self, family, pipe, max_sequence_length=None):
        super().__init__(family, pipe, max_sequence_length)
        if getattr(pipe.transformer.config, "guidance_embeds", False):
            raise ValueError("SANA-Sprint (guidance_embeds=True) is not supported: distill a SanaPipeline model")

    def _encode(self, prompts, device):
        instruction = inspect.signature(self.pipe.__call__).parameters.get("complex_human_instruction")
        kwargs = self._text_kwargs()
        if instruction is not None:
            kwargs["complex_human_instruction"] = instruction.default
        embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                     **kwargs)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def call(self, denoiser, x, t, cond):
        scale = float(getattr(unwrap(denoiser).config, "timestep_scale", 1.0))
        return denoiser(x, encoder_hidden_states=cond["prompt_embeds"],
                        encoder_attention_mask=cond["prompt_attention_mask"], timestep=t * scale).sample

    def pipeline_kwargs(self, cond, null, guidance):
        return masked_text_kwargs(cond, null, guidance)


class SanaFamily(Family):
    name = "sana"
    class_names = ("SanaTransformer2DModel",)
    native_attention = "sana-own"  # SanaLinearAttnProcessor2_0, ReLU linear attention

    def classes(self):
        from diffusers import SanaTransformer2DModel

        return (SanaTransformer2DModel,)

    def conditioner(self, pipe, max_sequence_length=None):
        return SanaConditioner(self, pipe, max_sequence_length)

    def tiny_pipeline(self, text_encoder: bool = False):
        """Tiny SANA: 2 blocks of 16 channels (ReLU linear self-attention, GLUMBConv), a 6-level DC-AE (stride 32,
        as the published ``dc-ae-f32c32``), the published flow-prediction DPM-Solver; with ``text_encoder``, a tiny
        random Gemma-2 and a character tokenizer."""
        from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

        torch.manual_seed(0)
        transformer = SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
            sample_size=2, patch_size=1,
        )
        blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
        vae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=blocks,
            decoder_block_types=blocks, encoder_block_out_channels=(4,) * 6, decoder_block_out_channels=(4,) * 6,
            encoder_qkv_multiscales=((),) * 3 + ((5,),) * 3, decoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
            encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6, downsample_block_type="conv",
            upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
            scaling_factor=0.41407,
        )
        encoder = tokenizer = None
        if text_encoder:
            from transformers import Gemma2Config, Gemma2Model

            encoder = Gemma2Model(Gemma2Config(vocab_size=128, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                               max_position_embeddings=4096))
            tokenizer = tiny_gemma_tokenizer()
        scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        return in_eval_mode(SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                                         scheduler=scheduler))

    def random_denoiser(self, width, depth, heads):
        """32 latent channels (DC-AE f32c32), patch 1, GLUMBConv, SDPA cross-attention."""
        from diffusers import SanaTransformer2DModel

        head_dim = width // heads
        torch.manual_seed(0)
        return SanaTransformer2DModel(in_channels=32, out_channels=32, num_attention_heads=heads,
                                      attention_head_dim=head_dim, num_layers=depth, num_cross_attention_heads=heads,
                                      cross_attention_head_dim=head_dim, cross_attention_dim=width, caption_channels=64,
                                      sample_size=32, patch_size=1).eval()

    def example_inputs(self, model, size, batch=2, text=16):
        rand, t = random_inputs(model)
        return {"hidden_states": rand(batch, 32, size, size), "encoder_hidden_states": rand(batch, text, 64),
                "timestep": t(batch)}


SANA = SanaFamily()

__all__ = ["SANA", "SanaConditioner", "SanaFamily"]
