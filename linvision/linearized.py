"""A pretrained softmax classifier turned into a linear-attention one, and its timm checkpoint.

>>> student = linearize_classifier(teacher, "lolcats", {"radius": 2})   # a copy; q/k/v/proj inherited
>>> save_pretrained(student, "out/student")                              # config.json + model.safetensors
>>> model = load_pretrained("out/student")

- a linvision ``linvit_*`` teacher: each block's ``attn`` is replaced by the new mixer
  (:func:`linvision.timm.inherit_mixer`); the student *is* a linvit with ``mixer=<new>``, saved with timm's
  ``save_for_hf`` so that ``timm.create_model("local-dir:out/student")`` (after ``import linvision``) rebuilds it.
- any other timm ViT/DeiT: :func:`linvision.timm.linearize` (timm blocks keep their ``Attention`` slot, wrapped
  in a ``TimmAttention``); saved the same way plus a ``linvision`` entry (mixer and options) in
  ``config.json``: :func:`load_pretrained` creates the timm architecture and linearizes it before loading.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import timm
from safetensors.torch import load_file
from timm.models import save_for_hf
from torch import nn

from .models.layout import MixerSpec, layer_options, resolve_mixers
from .models.vit import LinVisionTransformer
from .timm import inherit_mixer, linearize

LINVISION_KEY = "linvision"


def linearize_classifier(teacher: nn.Module, mixer: MixerSpec, options: Optional[Mapping[str, Any]] = None,
                         strict: bool = True) -> nn.Module:
    """A copy of ``teacher`` whose every softmax attention is mixer ``mixer`` with ``options`` (as linvit's
    ``mixer_kwargs``), initialised from the teacher's q/k/v/proj; new parameters keep the mixer's init.
    The student records ``linearized_spec = {"mixer", "options"}`` for :func:`save_pretrained`."""
    options = dict(options or {})
    student = copy.deepcopy(teacher)
    if isinstance(student, LinVisionTransformer):
        names = resolve_mixers(mixer, len(student.blocks))
        attns = [inherit_mixer(b.attn, n, strict=strict, **layer_options(n, options)) for b, n in zip(student.blocks, names)]
        for block, attn in zip(student.blocks, attns):
            attn.train(block.attn.training)
            block.attn = attn
        student.mixers = tuple(names)
    else:
        linearize(student, mixer, strict=strict, **options)
    student.linearized_spec = {"mixer": mixer, "options": options}
    return student


def save_pretrained(model: nn.Module, folder: Union[str, Path]) -> Path:
    """``config.json`` + ``model.safetensors`` (timm's ``save_for_hf``) of a :func:`linearize_classifier` result."""
    spec = getattr(model, "linearized_spec", None)
    if spec is None:
        raise ValueError("save_pretrained expects a model made by linearize_classifier (it has no linearized_spec)")
    folder = Path(folder)
    if isinstance(model, LinVisionTransformer):
        save_for_hf(model, str(folder), safe_serialization=True, model_args={"mixer": spec["mixer"], "mixer_kwargs": spec["options"]})
    else:
        save_for_hf(model, str(folder), safe_serialization=True, model_config={LINVISION_KEY: spec})
    return folder


def load_pretrained(folder: Union[str, Path], **kwargs) -> nn.Module:
    """The model saved by :func:`save_pretrained` (``kwargs`` go to ``timm.create_model``)."""
    folder = Path(folder)
    config: Dict[str, Any] = json.loads((folder / "config.json").read_text())
    spec = config.get(LINVISION_KEY)
    if spec is None:
        return timm.create_model(f"local-dir:{folder}", pretrained=True, **kwargs)
    args = {"num_classes": config["num_classes"], **config.get("model_args", {}), **kwargs}
    model = timm.create_model(config["architecture"], pretrained=False, **args)
    linearize(model, spec["mixer"], **spec["options"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    model.linearized_spec = spec
    return model


__all__ = ["linearize_classifier", "load_pretrained", "save_pretrained"]
