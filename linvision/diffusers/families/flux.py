"""The ``flux`` family: ``FluxTransformer2DModel`` (FLUX.1, joint attention, CLEAR's host).

Replaced: every ``FluxAttention`` (dual and single blocks; kind ``joint``). Geometry ``ids``: the packed 2×2
image-token grid is read from ``img_ids`` (or the call's ``linvision_grid``); latent stride = VAE factor × 2.
Conditions: ``prompt_embeds (B, L, C)``, ``pooled_prompt_embeds (B, P)``; the call packs latents 2×2, gives
``txt_ids`` zeros, ``timestep/1000`` and guidance 3.5 when the model embeds it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Family
from .conditioner import Conditioner, unwrap

FLUX_GUIDANCE = 3.5  # CLEAR/FLUX-dev training: the guidance embedding is fixed at 3.5


def pack_flux(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` → FLUX tokens ``(B, H/2·W/2, 4C)`` (2×2 patches, raster order)."""
    B, C, H, W = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"FLUX latents need even height and width, got {H}x{W}")
    x = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_flux(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_flux`: ``(B, H/2·W/2, 4C)`` → ``(B, C, H, W)`` (``height``, ``width``: latents)."""
    B, N, D = tokens.shape
    x = tokens.reshape(B, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, height, width)


def unpack_flux_latents(latents: Tensor, height: int, width: int, vae_scale_factor: int) -> Tensor:
    """FLUX's packed ``(B, (h/2)(w/2), 4C)`` latents → ``(B, C, h, w)`` (h = height / vae factor, in pixels)."""
    return unpack_flux(latents, height // vae_scale_factor, width // vae_scale_factor)


def flux_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """``(H/2·W/2, 3)`` ids ``(0, row, col)`` of the packed grid (FluxPipeline's ``_prepare_latent_image_ids``)."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


class FluxConditioner(Conditioner):
    """FLUX: latents packed 2×2, ``txt_ids`` zeros, ``timestep/1000``, guidance 3.5 when the model embeds it."""

    def _encode(self, prompts, device):
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, None, device=device, **self._text_kwargs())
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def call(self, denoiser, x, t, cond):
        B, _, H, W = x.shape
        tokens = pack_flux(x)
        embeds = cond["prompt_embeds"]
        guidance = None
        if getattr(unwrap(denoiser).config, "guidance_embeds", False):
            guidance = torch.full((B,), FLUX_GUIDANCE, device=x.device, dtype=x.dtype)
        out = denoiser(hidden_states=tokens, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                       pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=embeds,
                       txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype),
                       img_ids=flux_image_ids(H, W, x.device, x.dtype)).sample
        return unpack_flux(out, H, W)

    def pipeline_kwargs(self, cond, null, guidance):
        return {"prompt_embeds": cond["prompt_embeds"], "pooled_prompt_embeds": cond["pooled_prompt_embeds"]}


class FluxFamily(Family):
    name = "flux"
    class_names = ("FluxTransformer2DModel",)
    kind = "joint"
    rule = "ids"

    def classes(self):
        from diffusers import FluxTransformer2DModel

        return (FluxTransformer2DModel,)

    def is_target(self, name, module):
        from diffusers.models.transformers.transformer_flux import FluxAttention

        return isinstance(module, FluxAttention)

    def latent_stride(self, vae_factor, denoiser):
        return vae_factor * 2  # the 2x2 packing

    def unpack_latents(self, latents, height, width, vae_factor):
        return unpack_flux_latents(latents, height, width, vae_factor)

    def conditioner(self, pipe, max_sequence_length=None):
        return FluxConditioner(self, pipe, max_sequence_length)

    def tiny_pipeline(self, tokenizer_folder=None):
        """Tiny FLUX (1 dual + 1 single block, 1 latent channel); with ``tokenizer_folder``, tiny CLIP and T5
        encoders sharing the letter tokenizer."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        from .tiny import in_eval_mode, tiny_clip_tokenizer

        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        )
        vae = AutoencoderKL(block_out_channels=[4, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=1, norm_num_groups=1,
                            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
        encoders = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        if tokenizer_folder is not None:
            from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

            tokenizer = tiny_clip_tokenizer(tokenizer_folder)
            encoders = dict(
                text_encoder=CLIPTextModel(CLIPTextConfig(
                    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
                    bos_token_id=0, eos_token_id=2, pad_token_id=1)),
                tokenizer=tokenizer,
                text_encoder_2=T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                       num_heads=4)),
                tokenizer_2=tokenizer,
            )
        return in_eval_mode(FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                         transformer=transformer, **encoders))

    def random_denoiser(self, width, depth, heads):
        from diffusers import FluxTransformer2DModel

        head_dim = width // heads
        torch.manual_seed(0)
        return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=max(depth // 2, 1),
                                      num_single_layers=max(depth // 2, 1), attention_head_dim=head_dim,
                                      num_attention_heads=heads, joint_attention_dim=64, pooled_projection_dim=64,
                                      axes_dims_rope=[head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8]).eval()

    def example_inputs(self, model, size, batch=2, text=16):
        """A ``size``×``size`` latent packed 2×2: ``size/2`` tokens a side."""
        g = torch.Generator().manual_seed(0)
        p = next(model.parameters())
        side = size // 2
        ids = torch.zeros(side, side, 3, device=p.device)
        ids[..., 1] = torch.arange(side, device=p.device)[:, None]
        ids[..., 2] = torch.arange(side, device=p.device)[None]

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(device=p.device, dtype=p.dtype)

        t = torch.full((batch,), 500, dtype=torch.long)
        return {"hidden_states": rand(batch, side * side, 16), "encoder_hidden_states": rand(batch, text, 64),
                "pooled_projections": rand(batch, 64), "timestep": (t.float() / 1000).to(p.device),
                "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(text, 3, device=p.device)}


FLUX = FluxFamily()

__all__ = ["FLUX", "FLUX_GUIDANCE", "FluxConditioner", "FluxFamily", "flux_image_ids", "pack_flux", "unpack_flux",
           "unpack_flux_latents"]
