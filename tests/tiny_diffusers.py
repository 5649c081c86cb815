"""Tiny random-weight diffusers pipelines built from configs (no hub), for integration and job tests.

Each ``build_*`` returns its family's ``tiny_pipeline()`` (:mod:`linvision.diffusers.families`), in eval mode;
``save`` writes it to a folder and reloads it offline.
``run(pipe, family, height, width)`` samples 2 steps with precomputed text embeddings, so no tokenizer
or text encoder runs. Configs follow the team spec ``shared/spec/integration.md`` (diffusers' dummy components).
"""
from __future__ import annotations

import json
import os

import torch
from diffusers import DiffusionPipeline

from linvision.diffusers.families import DIT, FLUX, PIXART, SANA, SD3, UNET

FAMILIES = ("unet", "dit", "pixart", "sd3", "flux", "sana")
# Latent stride (pixels per image token at the top level) and a "training" resolution per family.
STRIDE = {"unet": 2, "dit": 8, "pixart": 4, "sd3": 2, "flux": 4, "sana": 32}
TRAIN_SIZE = {"unet": 32, "dit": 32, "pixart": 32, "sd3": 32, "flux": 32, "sana": 64}


def build_sd(tokenizer_folder=None):
    return UNET.tiny_pipeline(tokenizer_folder)


def build_dit():
    return DIT.tiny_pipeline()


def build_pixart():
    return PIXART.tiny_pipeline()


def build_sd3():
    return SD3.tiny_pipeline()


def build_flux(tokenizer_folder=None):
    """Tiny FLUX; with ``tokenizer_folder``, tiny CLIP and T5 encoders sharing the letter tokenizer."""
    return FLUX.tiny_pipeline(tokenizer_folder)


def build_sana(text_encoder: bool = False):
    """Tiny SANA (stride 32); with ``text_encoder``, a tiny random Gemma-2 and a character tokenizer."""
    return SANA.tiny_pipeline(text_encoder)


BUILDERS = {"unet": build_sd, "dit": build_dit, "pixart": build_pixart, "sd3": build_sd3, "flux": build_flux,
            "sana": build_sana}


def captioned_images(folder, sizes, seed: int = 0) -> str:
    """Random RGB images ``(h, w)`` named a.png, b.png, … in ``folder`` and ``captions.jsonl`` beside it; returns
    the captions path."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i, (h, w) in enumerate(sizes):
        name = f"{chr(ord('a') + i)}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, name))
        lines.append(json.dumps({"file": name, "text": f"a photo number {chr(ord('a') + i)}"}))
    path = os.path.join(os.path.dirname(os.path.abspath(folder)), "captions.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def save(pipe, folder: str) -> DiffusionPipeline:
    """Save ``pipe`` to ``folder`` and load it back offline (eval mode, fp32)."""
    pipe.save_pretrained(folder)
    return load(folder)


def load(folder: str) -> DiffusionPipeline:
    from linvision.sample.pipeline import load_pipeline

    return load_pipeline(folder)


def embeds(family: str, batch: int = 1):
    """Precomputed conditioning for ``family``: a kwargs dict for the pipeline call."""
    g = torch.Generator().manual_seed(123)
    if family == "unet":
        return {"prompt_embeds": torch.randn(batch, 6, 8, generator=g),
                "negative_prompt_embeds": torch.randn(batch, 6, 8, generator=g)}
    if family == "pixart":
        return {"prompt_embeds": torch.randn(batch, 5, 32, generator=g), "prompt_attention_mask": torch.ones(batch, 5),
                "negative_prompt_embeds": torch.randn(batch, 5, 32, generator=g),
                "negative_prompt_attention_mask": torch.ones(batch, 5), "negative_prompt": None}
    if family == "sana":
        return {"prompt_embeds": torch.randn(batch, 5, 8, generator=g), "prompt_attention_mask": torch.ones(batch, 5),
                "negative_prompt_embeds": torch.randn(batch, 5, 8, generator=g),
                "negative_prompt_attention_mask": torch.ones(batch, 5), "negative_prompt": None}
    if family == "sd3":
        return {"prompt_embeds": torch.randn(batch, 6, 32, generator=g),
                "pooled_prompt_embeds": torch.randn(batch, 16, generator=g),
                "negative_prompt_embeds": torch.randn(batch, 6, 32, generator=g),
                "negative_pooled_prompt_embeds": torch.randn(batch, 16, generator=g)}
    if family == "flux":
        return {"prompt_embeds": torch.randn(batch, 6, 32, generator=g),
                "pooled_prompt_embeds": torch.randn(batch, 32, generator=g)}
    return {"class_labels": list(range(batch))}


def run(pipe, family: str, height: int, width: int, steps: int = 2, seed: int = 0):
    """A ``(B, 3, H, W)`` float image tensor from a ``steps``-step run of ``pipe`` at ``height``×``width``."""
    generator = torch.Generator().manual_seed(seed)
    if family == "dit":
        from linvision.sample.dit import sample_dit

        return sample_dit(pipe, class_labels=[1], height=height, width=width, steps=steps, guidance_scale=1.5,
                          generator=generator, output_type="pt")
    kwargs = dict(height=height, width=width, num_inference_steps=steps, generator=generator, output_type="pt")
    if family in ("pixart", "sana"):
        kwargs["use_resolution_binning"] = False
    if family == "flux":
        kwargs["max_sequence_length"] = 6
    return pipe(**kwargs, **embeds(family)).images
