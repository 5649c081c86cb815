"""The ``linvision_dit`` family: linvision's own :class:`~linvision.models.dit.LinVisionDiT` (a class-conditional
DiT with any mixer, in a ``DiTPipeline``), as a teacher and as a student trained in the teacher/student loop.

It runs linvision mixers already, so there is no diffusers attention for an adapter to replace
(``DiffusersAdapter.construct_for`` refuses it). Its student is a whole model instead (kind ``"model"``):
:class:`MixerStudent` builds a ``LinVisionDiT`` with the teacher's config but another mixer (``mechanism``,
``options`` as its ``mixer_kwargs``), copies every teacher weight outside the mixers and lets each mixer
inherit its teacher mixer's q/k/v/proj (the mixers share those names; :mod:`linvision.mixers.inherit`), and
stands where an adapter stands in the distillation and sampling jobs: ``install(pipe)`` puts the student in
the pipeline (the teacher is kept for ``uninstall``), ``save_pretrained`` writes the student (a ``LinVisionDiT``
folder, loadable on its own) and :meth:`MixerStudent.from_pretrained` reads it back. Every parameter of the
student is the "adapter"'s (the student is new as a whole). The replaced layers are ``blocks.{i}.attn``.

Geometry ``patch``; conditions ``class_labels (B,)`` (the null class is ``num_classes``); sampled square only
(``linvision.sample.dit.sample_dit``).
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .base import Family, class_conditional_inputs, denoiser_of
from .conditioner import LabelConditioner
from .tiny import in_eval_mode, tiny_vae

MIXER_KEYS = ("mixer", "mixer_kwargs")  # the config keys a student may change


def _config(model: nn.Module) -> Dict[str, Any]:
    """``model``'s constructor arguments (the ``register_to_config`` ones, private keys dropped)."""
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def _is_mixer_key(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 3 and parts[0] == "blocks" and parts[2] == "attn"


class MixerStudent:
    """A ``LinVisionDiT`` student with another mixer, in the adapter's place (see the module docstring).

    ``model``: the student. ``config``: ``mechanism`` (its mixer), ``family``, ``kind`` and ``modules_list``
    (one ``{module_name}`` per block's mixer, the feature layers).
    """

    def __init__(self, model: nn.Module):
        from ...models.dit import LinVisionDiT

        if not isinstance(model, LinVisionDiT):
            raise ValueError(f"a linvision_dit student is a LinVisionDiT, not {type(model).__name__}")
        self.model = model
        self.config = SimpleNamespace(
            mechanism=model.config.mixer, family=LINVISION_DIT.name, kind=LINVISION_DIT.kind,
            modules_list=[{"module_name": f"blocks.{i}.attn"} for i in range(len(model.blocks))])
        self._teacher: Optional[nn.Module] = None
        self._pipe = None

    # ------------------------------------------------------------------ building
    @classmethod
    def construct_for(cls, pipe_or_denoiser, mechanism: str, *, inherit: Optional[str] = None,
                      install: bool = True, **options: Any) -> "MixerStudent":
        """The teacher's ``LinVisionDiT`` with mixer ``mechanism`` (``options``: its ``mixer_kwargs``; the bias
        layout follows the teacher's mixer unless given), the teacher's weights outside the mixers, and the
        mixers' projections per ``inherit`` (``qkv+proj``, ``proj``, ``none``; default: the paper's, as for an
        adapter). Seeded by the global generator (the new mixer parameters). Installed when ``pipe_or_denoiser``
        is a pipeline and ``install``."""
        from ...models.dit import LinVisionDiT
        from ..self_attention import INHERIT_MODES, default_inherit, inherit_weights, layout_options

        teacher = denoiser_of(pipe_or_denoiser)
        if not isinstance(teacher, LinVisionDiT):
            raise ValueError(f"the linvision_dit family takes a LinVisionDiT teacher, not {type(teacher).__name__}")
        inherit = default_inherit(mechanism) if inherit is None else inherit
        if inherit not in INHERIT_MODES:
            raise ValueError(f"unknown inherit={inherit!r}; expected one of {INHERIT_MODES}")
        layout = layout_options(mechanism, teacher.blocks[0].attn) if inherit != "none" else {}
        config = dict(_config(teacher), mixer=mechanism, mixer_kwargs={**layout, **options} or None)
        param = next(teacher.parameters())
        student = nn.Module.to(LinVisionDiT(**config), device=param.device, dtype=param.dtype)
        shared = {k: v for k, v in teacher.state_dict().items() if not _is_mixer_key(k)}
        missing, unexpected = student.load_state_dict(shared, strict=False)
        if unexpected or any(not _is_mixer_key(k) for k in missing):
            raise ValueError(f"the student does not match the teacher outside its mixers: missing "
                             f"{[k for k in missing if not _is_mixer_key(k)][:3]}, unexpected {unexpected[:3]}")
        for mine, theirs in zip(student.blocks, teacher.blocks):
            inherit_weights(mine.attn, theirs.attn, inherit)
        made = cls(student.eval())
        if install and not isinstance(pipe_or_denoiser, nn.Module):
            made.install(pipe_or_denoiser)
        return made

    def parameters(self):
        return self.model.parameters()

    def layers(self) -> List[nn.Module]:
        return [block.attn for block in self.model.blocks]

    # ------------------------------------------------------------------ installing
    @property
    def installed(self) -> bool:
        return self._pipe is not None

    def check_teacher(self, teacher: nn.Module) -> None:
        """``ValueError`` unless ``teacher`` is a ``LinVisionDiT`` with this student's config but for the mixer."""
        from ...models.dit import LinVisionDiT

        if not isinstance(teacher, LinVisionDiT):
            raise ValueError(f"this linvision_dit student needs a LinVisionDiT pipeline, not {type(teacher).__name__}")
        mine, theirs = _config(self.model), _config(teacher)
        differ = sorted(k for k in set(mine) | set(theirs) if k not in MIXER_KEYS and mine.get(k) != theirs.get(k))
        if differ:
            raise ValueError("the student does not match this LinVisionDiT: " + ", ".join(
                f"{k} {mine.get(k)!r} vs {theirs.get(k)!r}" for k in differ[:5]))

    def install(self, pipe) -> "MixerStudent":
        """Put the student in ``pipe`` (moved to the teacher's device and dtype); returns ``self``."""
        if self._pipe is not None:
            raise RuntimeError("this student is already installed; uninstall() it first")
        if isinstance(pipe, nn.Module) or not isinstance(getattr(pipe, "transformer", None), nn.Module):
            raise ValueError("a linvision_dit student is installed in a pipeline (pipe.transformer), not a model")
        teacher = pipe.transformer
        self.check_teacher(teacher)
        param = next(teacher.parameters())
        nn.Module.to(self.model, device=param.device, dtype=param.dtype)
        pipe.transformer = self.model
        self._teacher, self._pipe = teacher, pipe
        return self

    def uninstall(self) -> nn.Module:
        """Put the teacher back in the pipeline; returns it."""
        if self._pipe is None:
            raise RuntimeError("this student is not installed")
        self._pipe.transformer = self._teacher
        teacher, self._teacher, self._pipe = self._teacher, None, None
        return teacher

    # ------------------------------------------------------------------ files
    def save_pretrained(self, save_directory, **kwargs) -> None:
        """The student as a ``LinVisionDiT`` folder (``config.json`` + safetensors)."""
        self.model.save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, folder, **kwargs) -> "MixerStudent":
        """A student saved by :meth:`save_pretrained`; ``ValueError`` for a folder that holds none."""
        from ...models.dit import LinVisionDiT

        name = os.fspath(folder)
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(f"{name} is not a linvision_dit student folder (no config.json)")
        config = LinVisionDiT.load_config(name)
        if config.get("_class_name") != LinVisionDiT.__name__:
            raise ValueError(f"{name} holds a {config.get('_class_name')!r}, not a LinVisionDiT student")
        return cls(LinVisionDiT.from_pretrained(name, **kwargs).eval())

    def eval(self) -> "MixerStudent":
        self.model.eval()
        return self


class LinVisionDiTFamily(Family):
    name = "linvision_dit"
    class_names = ("LinVisionDiT",)
    kind = "model"
    text = False
    square_only = True
    student_class = MixerStudent

    def classes(self):
        from ...models.dit import LinVisionDiT

        return (LinVisionDiT,)

    def target_attentions(self, denoiser):
        raise ValueError(f"found no attention to replace in {type(denoiser).__name__}: it runs linvision mixers "
                         "already (distill it into a student with another mixer: MixerStudent.construct_for)")

    def conditioner(self, pipe, max_sequence_length=None):
        return LabelConditioner(self, pipe, max_sequence_length)

    def null_class(self, denoiser) -> int:
        """``LinVisionDiT``'s unconditional class id: ``num_classes``."""
        return int(denoiser.config.num_classes)

    def tiny_pipeline(self, mixer: str = "softmax", mixer_kwargs=None, mlp_layer: str = "mlp",
                      pos_embed: str = "sincos", seed: int = 0):
        """A ``DiTPipeline`` around a tiny random ``LinVisionDiT``: 2 blocks of 16 channels, patch 2 on 8×8
        latents (learned sigma, 1000 classes + null), a 2-level VAE (factor 2), DDIM; latent stride 4, 16 px.
        The zero-initialised adaLN and output layers get small random weights, so every weight matters."""
        from diffusers import DDIMScheduler, DiTPipeline

        from ...models.dit import LinVisionDiT

        torch.manual_seed(seed)
        model = LinVisionDiT(sample_size=8, patch_size=2, in_channels=4, num_layers=2, num_attention_heads=2,
                             attention_head_dim=8, mixer=mixer, mixer_kwargs=mixer_kwargs, mlp_layer=mlp_layer,
                             mlp_ratio=2.0, pos_embed=pos_embed, num_classes=1000)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        return in_eval_mode(DiTPipeline(transformer=model, vae=tiny_vae(blocks=2),
                                        scheduler=DDIMScheduler(steps_offset=1)))

    def random_denoiser(self, width, depth, heads, mixer: str = "softmax"):
        from ...models.dit import LinVisionDiT

        torch.manual_seed(0)
        return LinVisionDiT(sample_size=32, patch_size=2, in_channels=4, num_layers=depth, num_attention_heads=heads,
                            attention_head_dim=width // heads, mixer=mixer).eval()

    def example_inputs(self, model, size, batch=2, text=16):
        return class_conditional_inputs(model, size, batch)


LINVISION_DIT = LinVisionDiTFamily()

__all__ = ["LINVISION_DIT", "LinVisionDiTFamily", "MixerStudent"]
