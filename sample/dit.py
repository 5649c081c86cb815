"""Class-conditional DiT sampling at any (square) resolution, with SDEdit starts.

diffusers' ``DiTPipeline`` always samples at ``transformer.config.sample_size``; this loop is the same
algorithm (CFG over ``[cond; null]`` labels, learned-sigma channels dropped) with the latent size taken
from ``height``/``width``, an optional initial latent re-noised to ``strength`` (SDEdit) and a per-step
callback. diffusers' ``DiTTransformer2DModel`` unpatchifies square grids only, so height must equal width.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor

NULL_CLASS = 1000


def vae_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def initial_noise(shape, generator) -> Tensor:
    """fp32 CPU noise of ``shape``; ``generator`` may be a list (one per image, as diffusers pipelines take)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@torch.no_grad()
def encode_images(pipe, images) -> Tensor:
    """PIL images → scaled DiT latents ``(B, C, H/f, W/f)`` (the mean of the VAE posterior)."""
    import numpy as np

    x = torch.from_numpy(np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) / 127.5 - 1 for i in images]))
    x = x.permute(0, 3, 1, 2).to(device=pipe.vae.device, dtype=pipe.vae.dtype)
    return pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor


@torch.no_grad()
def sample_dit(
    pipe,
    class_labels: List[int],
    height: int,
    width: int,
    steps: int = 50,
    guidance_scale: float = 4.0,
    generator=None,
    output_type: str = "pil",
    init_latents: Optional[Tensor] = None,
    strength: float = 1.0,
    callback: Optional[Callable[[int], None]] = None,
):
    """Images ``(B, 3, H, W)`` in [0, 1] (``output_type="pt"``), PIL images, or latents (``"latent"``).

    ``init_latents (B, C, H/f, W/f)``: start from these, noised to the timestep at ``strength`` of the
    schedule, and run only the last ``int(steps·strength)`` steps (SDEdit). ``callback(step)`` after each step.
    """
    transformer, scheduler = pipe.transformer, pipe.scheduler
    f = vae_factor(pipe)
    stride = f * int(transformer.config.patch_size)
    if height != width:
        raise ValueError(
            f"DiT samples square images only (diffusers' DiTTransformer2DModel unpatchifies a square grid); "
            f"got {height}x{width}"
        )
    if height % stride:
        raise ValueError(f"height={height} must be a multiple of the latent stride {stride}")
    device, dtype = transformer.device, transformer.dtype
    batch = len(class_labels)
    channels = transformer.config.in_channels
    shape = (batch, channels, height // f, width // f)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    noise = initial_noise(shape, generator).to(device=device, dtype=dtype)
    if init_latents is None:
        latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    else:
        if tuple(init_latents.shape) != shape:
            raise ValueError(f"init_latents must have shape {shape}, got {tuple(init_latents.shape)}")
        keep = min(max(int(steps * strength), 1), steps)
        start = steps - keep
        timesteps = timesteps[start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        latents = scheduler.add_noise(init_latents.to(device=device, dtype=dtype), noise, timesteps[:1])
    guided = guidance_scale > 1
    labels = torch.tensor(class_labels, device=device).reshape(-1)
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        t_batch = (t if torch.is_tensor(t) else torch.tensor(t)).reshape(1).to(device).expand(model_input.shape[0])
        out = transformer(model_input, timestep=t_batch, class_labels=labels).sample
        eps = out[:, :channels]
        if guided:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
        if callback is not None:
            callback(i)
    if output_type == "latent":
        return latents
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1).float()
    if output_type == "pt":
        return image
    from diffusers.utils import numpy_to_pil

    return numpy_to_pil(image.permute(0, 2, 3, 1).cpu().numpy())


__all__ = ["NULL_CLASS", "encode_images", "initial_noise", "sample_dit"]
