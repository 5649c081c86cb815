"""The base of each family's conditioning during distillation (the subclasses live in the family files).

A *condition* is a dict of per-sample tensors with a leading batch dimension, the same for teacher and
student (so they always see identical inputs). :meth:`Conditioner.call` runs a denoiser on latents
``x (B, C, H, W)`` at timesteps ``t (B,)`` and returns its prediction in the latent layout ``(B, C_out, H, W)``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import vae_scale_factor

Condition = Dict[str, Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP/compile wrapper (for reading ``config`` and attributes)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


class Conditioner:
    """Per-family conditioning; build with ``family.conditioner(pipe)`` (:func:`linvision.distill.conditioner_for`).

    ``family``: the :class:`~.base.Family` (its ``str`` is the family name); ``text``: prompts (False: labels).
    """

    def __init__(self, family, pipe, max_sequence_length: Optional[int] = None):
        self.family = family
        self.text = family.text
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = vae_scale_factor(pipe)

    def _text_kwargs(self) -> Dict[str, Any]:
        return {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}

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


class LabelConditioner(Conditioner):
    """Class-conditional DiTs (diffusers' and linvision's): ``class_labels (B,)`` int64; the null class, for CFG,
    is the family's ``null_class(denoiser)``."""

    def labels(self, labels, device=None) -> Condition:
        return {"class_labels": torch.as_tensor(list(labels), dtype=torch.int64, device=device)}

    def null_label(self) -> int:
        return self.family.null_class(self.pipe.transformer)

    def call(self, denoiser, x, t, cond):
        return denoiser(x, timestep=t, class_labels=cond["class_labels"]).sample

    def pipeline_kwargs(self, cond, null, guidance):
        return {"class_labels": cond["class_labels"].tolist()}


__all__ = ["Condition", "Conditioner", "LabelConditioner", "unwrap"]
