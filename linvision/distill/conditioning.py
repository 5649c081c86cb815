"""How each denoiser family is conditioned and called during distillation.

A *condition* is a dict of per-sample tensors with a leading batch dimension, the same for teacher and
student (so they always see identical inputs):

| family | condition keys                                                       | from                          |
|--------|----------------------------------------------------------------------|-------------------------------|
| dit    | ``class_labels (B,)`` int64 (the null class, for CFG, is ``num_embeds_ada_norm``) | labels           |
| unet   | ``prompt_embeds (B, L, C)`` [+ ``pooled_prompt_embeds (B, P)`` for SDXL] | ``pipe.encode_prompt``     |
| pixart | ``prompt_embeds (B, L, C)``, ``prompt_attention_mask (B, L)``          | ``pipe.encode_prompt``        |
| sana   | ``prompt_embeds (B, L, C)``, ``prompt_attention_mask (B, L)``          | ``pipe.encode_prompt`` (Gemma, with the pipeline's complex human instruction) |
| sd3    | ``prompt_embeds (B, L, C)``, ``pooled_prompt_embeds (B, P)``           | ``pipe.encode_prompt``        |
| flux   | ``prompt_embeds (B, L, C)``, ``pooled_prompt_embeds (B, P)``           | ``pipe.encode_prompt``        |

:meth:`Conditioner.call` runs a denoiser on latents ``x (B, C, H, W)`` at timesteps ``t (B,)`` and
returns its prediction in the latent layout ``(B, C_out, H, W)`` (FLUX's 2×2 packing and ids are done
here; SDXL's ``time_ids`` and PixArt's resolution conditions are derived from the latent size).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

Condition = Dict[str, Tensor]
FLUX_GUIDANCE = 3.5  # CLEAR/FLUX-dev training: the guidance embedding is fixed at 3.5


def pack_flux(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` → FLUX tokens ``(B, H/2·W/2, 4C)`` (2×2 patches, raster order)."""
    B, C, H, W = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"FLUX latents need even height and width, got {H}x{W}")
    x = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_flux(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_flux`: ``(B, H/2·W/2, 4C)`` → ``(B, C, H, W)``."""
    B, N, D = tokens.shape
    x = tokens.reshape(B, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, height, width)


def flux_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """``(H/2·W/2, 3)`` ids ``(0, row, col)`` of the packed grid (FluxPipeline's ``_prepare_latent_image_ids``)."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP/compile wrapper (for reading ``config`` and attributes)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


class Conditioner:
    """Per-family conditioning (see the module table). Build with :func:`conditioner_for`."""

    family = "base"
    text = True  # conditioned on prompts (False: class labels)

    def __init__(self, pipe, max_sequence_length: Optional[int] = None):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", None)
                                    or 2 ** (len(pipe.vae.config.block_out_channels) - 1))

    # --- conditions -------------------------------------------------------------------------------
    def has_text_encoder(self) -> bool:
        return getattr(self.pipe, "text_encoder", None) is not None or getattr(self.pipe, "text_encoder_2", None) is not None

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], device=None) -> Condition:
        """Text conditions for ``prompts`` (the pipeline's own ``encode_prompt``); ``ValueError`` without encoders."""
        if not self.has_text_encoder():
            raise ValueError(f"{type(self.pipe).__name__} has no text encoder: cannot encode prompts (give cached "
                             "text embeddings, or a pipeline with its text encoders)")
        return self._encode(list(prompts), device or self._device())

    def _encode(self, prompts: List[str], device) -> Condition:
        raise NotImplementedError

    def labels(self, labels: Sequence[int], device=None) -> Condition:
        raise ValueError(f"a {self.family} denoiser is conditioned on text, not class labels")

    def null_label(self) -> int:
        raise ValueError(f"a {self.family} denoiser has no null class")

    def _device(self):
        for name in ("text_encoder", "text_encoder_2", "transformer", "unet"):
            module = getattr(self.pipe, name, None)
            if isinstance(module, nn.Module):
                return next(module.parameters()).device
        return torch.device("cpu")

    # --- calls ------------------------------------------------------------------------------------
    def call(self, denoiser: nn.Module, x: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """Prediction ``(B, C_out, H, W)`` of ``denoiser`` for latents ``x (B, C, H, W)`` at timesteps ``t (B,)``."""
        raise NotImplementedError

    def pipeline_kwargs(self, cond: Condition, null: Optional[Condition], guidance: float) -> Dict[str, Any]:
        """Keyword arguments of the pipeline's ``__call__`` that draw images for ``cond`` (sampling checks)."""
        kwargs = {"prompt_embeds": cond["prompt_embeds"]}
        if "pooled_prompt_embeds" in cond:
            kwargs["pooled_prompt_embeds"] = cond["pooled_prompt_embeds"]
        if guidance > 1 and null is not None:
            n = cond["prompt_embeds"].shape[0]
            kwargs["negative_prompt_embeds"] = null["prompt_embeds"].expand(n, *null["prompt_embeds"].shape[1:])
            if "pooled_prompt_embeds" in null:
                kwargs["negative_pooled_prompt_embeds"] = null["pooled_prompt_embeds"].expand(
                    n, *null["pooled_prompt_embeds"].shape[1:])
        return kwargs


class DiTConditioner(Conditioner):
    family = "dit"
    text = False

    def labels(self, labels, device=None) -> Condition:
        return {"class_labels": torch.as_tensor(list(labels), dtype=torch.int64, device=device)}

    def null_label(self) -> int:
        """DiT's unconditional class id (diffusers' ``LabelEmbedding`` keeps row ``num_classes`` for it)."""
        return int(self.pipe.transformer.config.num_embeds_ada_norm)

    def call(self, denoiser, x, t, cond):
        return denoiser(x, timestep=t, class_labels=cond["class_labels"]).sample

    def pipeline_kwargs(self, cond, null, guidance):
        return {"class_labels": cond["class_labels"].tolist()}


class UNetConditioner(Conditioner):
    """SD 1.5/2.1 (``prompt_embeds``) and SDXL (``+ pooled_prompt_embeds``; ``time_ids`` from the size)."""

    family = "unet"

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


class PixArtConditioner(Conditioner):
    family = "pixart"

    def _encode(self, prompts, device):
        kwargs = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                     **kwargs)
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
        kwargs = {"prompt_embeds": cond["prompt_embeds"], "prompt_attention_mask": cond["prompt_attention_mask"],
                  "negative_prompt": None, "use_resolution_binning": False}
        if guidance > 1 and null is not None:
            n = cond["prompt_embeds"].shape[0]
            kwargs["negative_prompt_embeds"] = null["prompt_embeds"].expand(n, *null["prompt_embeds"].shape[1:])
            kwargs["negative_prompt_attention_mask"] = null["prompt_attention_mask"].expand(
                n, *null["prompt_attention_mask"].shape[1:])
        return kwargs


class SanaConditioner(PixArtConditioner):
    """SANA (``SanaPipeline``): Gemma-2 embeddings and mask like PixArt's T5 ones; ``timestep`` scaled by the
    model's ``timestep_scale`` as the pipeline does; no resolution conditions. Prompts are encoded with the
    pipeline's default ``complex_human_instruction`` (what ``SanaPipeline.__call__`` prepends), so the student
    trains on the conditions the pipeline samples with. SANA-Sprint (``guidance_embeds``, SCM timesteps) is
    refused: its few-step sampler is not the flow-matching pipeline this conditioner calls."""

    family = "sana"

    def __init__(self, pipe, max_sequence_length: Optional[int] = None):
        super().__init__(pipe, max_sequence_length)
        if getattr(pipe.transformer.config, "guidance_embeds", False):
            raise ValueError("SANA-Sprint (guidance_embeds=True) is not supported: distill a SanaPipeline model")

    def _encode(self, prompts, device):
        import inspect

        instruction = inspect.signature(self.pipe.__call__).parameters.get("complex_human_instruction")
        kwargs = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        if instruction is not None:
            kwargs["complex_human_instruction"] = instruction.default
        embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                     **kwargs)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def call(self, denoiser, x, t, cond):
        scale = float(getattr(unwrap(denoiser).config, "timestep_scale", 1.0))
        return denoiser(x, encoder_hidden_states=cond["prompt_embeds"],
                        encoder_attention_mask=cond["prompt_attention_mask"], timestep=t * scale).sample


class SD3Conditioner(Conditioner):
    family = "sd3"

    def _encode(self, prompts, device):
        kwargs = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=device,
                                                       do_classifier_free_guidance=False, **kwargs)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def call(self, denoiser, x, t, cond):
        return denoiser(hidden_states=x, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                        pooled_projections=cond["pooled_prompt_embeds"]).sample


class FluxConditioner(Conditioner):
    """FLUX: latents packed 2×2, ``txt_ids`` zeros, ``timestep/1000``, guidance 3.5 when the model embeds it."""

    family = "flux"

    def _encode(self, prompts, device):
        kwargs = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, None, device=device, **kwargs)
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


CONDITIONERS = {"dit": DiTConditioner, "unet": UNetConditioner, "pixart": PixArtConditioner, "sd3": SD3Conditioner,
                "flux": FluxConditioner, "sana": SanaConditioner}


def conditioner_for(pipe, max_sequence_length: Optional[int] = None) -> Conditioner:
    """The :class:`Conditioner` of ``pipe``'s denoiser family."""
    from ..diffusers import denoiser_of, family_of

    return CONDITIONERS[family_of(denoiser_of(pipe)).name](pipe, max_sequence_length)


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


__all__ = ["CONDITIONERS", "Condition", "Conditioner", "FLUX_GUIDANCE", "concat", "conditioner_for", "flux_image_ids",
           "pack_flux", "select", "to", "unpack_flux", "unwrap"]
