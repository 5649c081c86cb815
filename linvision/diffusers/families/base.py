"""The :class:`Family` object: everything about one kind of diffusers denoiser that the adapters, the distillation
and the jobs need, in one place (one file per family beside this one, one registry in ``__init__``).

A family owns:

- which denoiser classes it is (:meth:`Family.classes`) and how it is found in a pipeline (:func:`denoiser_of`);
- its attention targets (:meth:`Family.is_target`, :meth:`Family.target_attentions`) and their kind: ``"self"``
  (a diffusers ``Attention`` swapped for a linvision mixer), ``"joint"`` (SD3/FLUX: processor and image-stream
  projections swapped) or ``"model"`` (linvision's own DiT: the student is a whole model with another mixer);
- its latent geometry: the :class:`~linvision.diffusers.geometry.LatentGeometry` rule, the patch size and the
  latent stride in pixels, FLUX's packing (:meth:`Family.unpack_latents`), and whether it samples squares only;
- its conditioning: text (prompts) or class labels, and the :class:`~.conditioner.Conditioner` that encodes and
  calls it during distillation;
- its student part: a ``DiffusersAdapter`` unless ``student_class`` names another (``linvision_dit``'s
  ``MixerStudent``), built and loaded through :mod:`linvision.diffusers.students`;
- its tiny random test pipeline (:meth:`Family.tiny_pipeline`, built from configs, no download) and the
  random-weight denoiser of a named size the benchmarks measure (:meth:`Family.random_denoiser`,
  :meth:`Family.example_inputs`).

The prediction target (ε, v or flow) is not a family property: models of one family train on different ones
(SD 1.5 ε, SD 2.1 v), so it is read from the pipeline's scheduler (:class:`linvision.distill.Objective`).
Families are stateless; the registry holds one instance of each.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..geometry import LatentGeometry

KINDS = ("self", "joint", "model")


def denoiser_of(pipe_or_denoiser) -> nn.Module:
    """The denoiser of a pipeline (``pipe.unet`` or ``pipe.transformer``), or the argument itself if a model."""
    if isinstance(pipe_or_denoiser, nn.Module):
        return pipe_or_denoiser
    for name in ("unet", "transformer"):
        model = getattr(pipe_or_denoiser, name, None)
        if isinstance(model, nn.Module):
            return model
    raise ValueError(f"{type(pipe_or_denoiser).__name__} has no unet or transformer denoiser")


def vae_scale_factor(pipe) -> int:
    """Pixels per latent: the pipeline's ``vae_scale_factor``, else ``2**(VAE levels − 1)`` (DiTPipeline has none)."""
    factor = getattr(pipe, "vae_scale_factor", None)
    if factor is None:
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(factor)


def _check_not_installed(name: str, module: nn.Module) -> None:
    from ..joint import JointProcessor
    from ..self_attention import SelfAttentionShell

    if isinstance(module, SelfAttentionShell) or isinstance(getattr(module, "processor", None), JointProcessor):
        raise ValueError(f"{name} already runs a linvision adapter; uninstall it first")


def random_inputs(model):
    """``(rand(*shape), t(batch))``: seeded normal tensors on ``model``'s device and dtype, and timesteps 500."""
    g = torch.Generator().manual_seed(0)
    p = next(model.parameters())

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=p.device, dtype=p.dtype)

    def t(batch):
        return torch.full((batch,), 500, dtype=torch.long).to(p.device)

    return rand, t


def class_conditional_inputs(model, size: int, batch: int = 2) -> Dict[str, Any]:
    """One call's keyword arguments for a class-conditional DiT (diffusers' or linvision's): ``hidden_states``
    ``(batch, 4, size, size)`` seeded normal latents, ``timestep (batch,)`` at 500, ``class_labels (batch,)``
    ``0 … batch − 1``, on ``model``'s device (latents in its dtype)."""
    rand, t = random_inputs(model)
    return {"hidden_states": rand(batch, 4, size, size), "timestep": t(batch),
            "class_labels": torch.arange(batch, device=next(model.parameters()).device)}


class Family:
    """One denoiser family (see the module docstring); subclasses set the class attributes and override what
    differs. ``str(family)`` is its name, as adapters save it in ``config.json``."""

    name: str = ""
    class_names: Tuple[str, ...] = ()  # the denoiser classes, for messages (``classes()`` imports them)
    kind: str = "self"
    rule: str = "patch"  # LatentGeometry rule
    text: bool = True  # conditioned on prompts (False: class labels)
    square_only: bool = False  # its sampler draws square images only
    native_attention: str = "softmax"  # what its own attention is called in benchmark tables
    student_class: Optional[type] = None  # its student part's class; None: a DiffusersAdapter (linvision.diffusers.students)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<family {self.name}: {', '.join(self.class_names)}>"

    # --- which models ------------------------------------------------------------------------------------
    def classes(self) -> Tuple[type, ...]:
        raise NotImplementedError

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, self.classes())

    # --- geometry ----------------------------------------------------------------------------------------
    def patch_size(self, denoiser: nn.Module) -> int:
        """Latents per image token along a side (the ``patch`` rule's patch; 1 for the other rules)."""
        return int(denoiser.config.patch_size) if self.rule == "patch" else 1

    def latent_stride(self, vae_factor: int, denoiser: nn.Module) -> int:
        """Pixels per top-level image-token row/column: the VAE factor times the patch."""
        return vae_factor * self.patch_size(denoiser)

    def geometry(self, denoiser: nn.Module) -> LatentGeometry:
        """A fresh :class:`LatentGeometry` for ``denoiser`` (the adapter's, recorded by its pre-hook)."""
        return LatentGeometry(self.rule, self.patch_size(denoiser))

    def unpack_latents(self, latents: Tensor, height: int, width: int, vae_factor: int) -> Tensor:
        """The pipeline's ``output_type="latent"`` result → ``(B, C, height/f, width/f)`` (already so here)."""
        return latents

    # --- attention targets -------------------------------------------------------------------------------
    def is_target(self, name: str, module: nn.Module) -> bool:
        """A self-attention ``…attn1`` (diffusers ``Attention``, not cross-attention)."""
        from diffusers.models.attention_processor import Attention

        return isinstance(module, Attention) and name.rsplit(".", 1)[-1] == "attn1" and not module.is_cross_attention

    def target_attentions(self, denoiser: nn.Module) -> List[Tuple[str, nn.Module]]:
        """``(qualified name, module)`` of every attention the adapter replaces, in ``named_modules`` order;
        ``ValueError`` when an adapter is already installed or there is none."""
        found = []
        for name, module in denoiser.named_modules():
            _check_not_installed(name, module)
            if self.is_target(name, module):
                found.append((name, module))
        if not found:
            raise ValueError(f"found no attention to replace in {type(denoiser).__name__}")
        return found

    # --- conditioning ------------------------------------------------------------------------------------
    def conditioner(self, pipe, max_sequence_length: Optional[int] = None):
        """The :class:`~.conditioner.Conditioner` that encodes conditions for ``pipe`` and calls its denoiser."""
        raise NotImplementedError

    # --- builders for tests and benchmarks ---------------------------------------------------------------
    def tiny_pipeline(self, **options: Any):
        """A tiny random-weight pipeline of this family, built from configs (no download), in eval mode."""
        raise NotImplementedError

    def random_denoiser(self, width: int, depth: int, heads: int) -> nn.Module:
        """A random-weight denoiser (eval mode): ``width`` attention channels, ``depth`` blocks, ``heads`` heads."""
        raise NotImplementedError

    def example_inputs(self, model: nn.Module, size: int, batch: int = 2, text: int = 16) -> Dict[str, Any]:
        """Keyword arguments of one call of :meth:`random_denoiser`'s model on a ``size``×``size`` latent."""
        raise NotImplementedError


__all__ = ["Family", "KINDS", "class_conditional_inputs", "denoiser_of", "random_inputs", "vae_scale_factor"]
