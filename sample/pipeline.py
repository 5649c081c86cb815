"""Loading a diffusers pipeline (hub id or local folder) and attaching an adapter.

``DiffusionPipeline.from_pretrained`` refuses a folder whose ``model_index.json`` lists a component as
``[null, null]`` (a pipeline saved without tokenizer or safety checker) unless that component is passed
explicitly as None; :func:`load_pipeline` does that for every such component.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import torch
from torch import nn

from linvision.diffusers.families import vae_scale_factor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def offline(name_or_path: str) -> bool:
    """True for a local folder or when ``HF_HUB_OFFLINE`` is set: load with ``local_files_only``."""
    return os.path.isdir(name_or_path) or bool(os.environ.get("HF_HUB_OFFLINE"))


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@contextlib.contextmanager
def _quiet_loading():
    from diffusers.utils import logging as diffusers_logging

    was_enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            diffusers_logging.enable_progress_bar()


def load_pipeline(name_or_path: str, dtype: str = "float32", device: str = "cpu"):
    """A ``DiffusionPipeline`` from a hub id or a local folder, on ``device`` in ``dtype``, in eval mode."""
    import diffusers
    from diffusers import DiffusionPipeline

    from linvision.diffusers.files import check_source

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    check_source(name_or_path, "diffusers pipeline", "model_index.json")  # a missing folder: one clear line
    local = offline(name_or_path)
    try:
        config = DiffusionPipeline.load_config(name_or_path, local_files_only=local)
    except Exception as e:  # noqa: BLE001 - rewrap with the name the user gave
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read a pipeline from {name_or_path!r}: {first}") from None
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    nones = {}
    if cls is not None:
        expected, _ = DiffusionPipeline._get_signature_keys(cls)
        nones = {k: None for k in expected if config.get(k) in (None, [None, None])}
    # diffusers 0.42 renamed torch_dtype to dtype (the old name still works, with a warning)
    dtype_key = "dtype" if _version(diffusers.__version__) >= (0, 42) else "torch_dtype"
    with _quiet_loading():  # no per-component progress bar: stderr is for the job's own bar and errors
        pipe = DiffusionPipeline.from_pretrained(name_or_path, local_files_only=local, **{dtype_key: DTYPES[dtype]},
                                                 **nones)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser(pipe) -> nn.Module:
    from linvision.diffusers import denoiser_of

    return denoiser_of(pipe)


def attach_adapter(pipe, adapter: Optional[str]):
    """Load ``adapter`` (folder or hub id, ours or LinFusion's; a LinVisionDiT student folder for that family) and
    install it in ``pipe``; None: nothing."""
    if not adapter:
        return None
    from linvision.diffusers.students import load_student

    return load_student(pipe, adapter).install(pipe)


def latent_stride(pipe) -> int:
    """Pixels per top-level image token row/column: VAE factor × patch (DiT/PixArt/SD3) or ×2 (FLUX packing).

    The UNet stride is the VAE factor only (the UNet pads odd levels itself).
    """
    from linvision.diffusers import family_of

    model = denoiser(pipe)
    return family_of(model).latent_stride(vae_scale_factor(pipe), model)


def check_size(pipe, height: int, width: int) -> None:
    """``ValueError`` unless ``height`` and ``width`` are positive multiples of the latent stride."""
    stride = latent_stride(pipe)
    bad = [f"{n}={v}" for n, v in (("height", height), ("width", width)) if v <= 0 or v % stride]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} must be a positive multiple of the latent stride {stride} of this pipeline "
            f"(e.g. {max(stride, (height // stride) * stride)})"
        )


def check_class_labels(pipe, labels: Sequence[int], key: str = "class_labels") -> None:
    """``ValueError`` naming ``key`` unless every label is a class id of the class-conditional denoiser
    (DiT: ``0 <= label < num_embeds_ada_norm``); a denoiser without a label table is not checked here."""
    classes = getattr(getattr(denoiser(pipe), "config", None), "num_embeds_ada_norm", None)
    if not labels or classes is None:
        return
    bad = [label for label in labels if not 0 <= label < int(classes)]
    if bad:
        raise ValueError(f"{key}: {type(pipe).__name__} has {classes} classes, so class ids must be in "
                         f"[0, {int(classes) - 1}]; got {bad}")


__all__ = ["DTYPES", "vae_scale_factor", "attach_adapter", "check_class_labels", "check_size", "latent_stride",
           "load_pipeline", "offline"]
