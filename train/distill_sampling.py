"""Drawing through the pipeline during distillation: the teacher's own training samples, and the periodic
teacher-vs-student comparison (same conditions, same seeds, so the same initial noise).

The comparison writes ``samples/step_XXXXXX.png``: the teacher's images on the top row, the student's
below, one column per (condition, seed); its number is the per-pixel MSE between the two rows, images in
[0, 1] (mean over pixels, channels and images).
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from linvision.distill.conditioning import Condition, Conditioner


@contextlib.contextmanager
def swap_denoiser(pipe, model: nn.Module) -> Iterator[None]:
    """Run the body with ``model`` as the pipeline's denoiser (``unet`` or ``transformer``); restore it after."""
    name = "unet" if isinstance(getattr(pipe, "unet", None), nn.Module) else "transformer"
    original = getattr(pipe, name)
    setattr(pipe, name, model)
    try:
        yield
    finally:
        setattr(pipe, name, original)


@torch.no_grad()
def draw(pipe, conditioner: Conditioner, cond: Condition, null: Optional[Condition], seeds: Sequence[int],
         resolution: int, steps: int, guidance: float, output_type: str = "pt") -> Tensor:
    """Images ``(B, 3, R, R)`` in [0, 1] (``"pt"``) or model-space latents ``(B, C, h, w)`` (``"latent"``) for
    the ``B`` rows of ``cond``, row ``i`` from ``torch.Generator().manual_seed(seeds[i])``."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if not conditioner.text:  # the class-conditional DiTs: diffusers' DiTPipeline samples at its sample_size only
        from linvision.sample.dit import sample_dit

        return sample_dit(pipe, cond["class_labels"].tolist(), resolution, resolution, steps=steps,
                          guidance_scale=guidance, generator=generators, output_type=output_type)
    kwargs = conditioner.pipeline_kwargs(cond, null, guidance)
    kwargs.update(height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=guidance,
                  generator=generators, output_type=output_type)
    params = inspect.signature(pipe.__call__).parameters
    out = pipe(**{k: v for k, v in kwargs.items() if k in params}).images
    if output_type == "latent":
        out = conditioner.family.unpack_latents(out, resolution, resolution, conditioner.vae_scale_factor)
    return out


class SampleComparer:
    """Teacher and student images for fixed conditions and seeds; the teacher's are drawn once.

    ``conds``: ``K`` condition rows; every row is drawn with every seed (``K·S`` images).
    """

    def __init__(self, pipe, conditioner: Conditioner, teacher: nn.Module, conds: Condition,
                 null: Optional[Condition], seeds: Sequence[int], resolution: int, steps: int, guidance: float,
                 folder: Path):
        k = next(iter(conds.values())).shape[0]
        rows = [i for i in range(k) for _ in seeds]
        self.cond = {name: v[rows] for name, v in conds.items()}
        self.seeds = [int(s) for _ in range(k) for s in seeds]
        self.pipe, self.conditioner, self.teacher, self.null = pipe, conditioner, teacher, null
        self.resolution, self.steps, self.guidance = resolution, steps, guidance
        self.folder = Path(folder)
        self._teacher_images: Optional[Tensor] = None

    def _draw(self) -> Tensor:
        return draw(self.pipe, self.conditioner, self.cond, self.null, self.seeds, self.resolution, self.steps,
                    self.guidance).float().cpu()

    def teacher_images(self) -> Tensor:
        if self._teacher_images is None:
            with swap_denoiser(self.pipe, self.teacher):
                self._teacher_images = self._draw()
        return self._teacher_images

    def compare(self, step: int, write: bool = True) -> Dict[str, object]:
        """Draw the student's images (the pipeline's denoiser), return ``{"step", "sample_mse", "grid"}``."""
        teacher = self.teacher_images()
        student = self._draw()
        mse = float(((student - teacher) ** 2).mean())
        record: Dict[str, object] = {"step": int(step), "sample_mse": mse}
        if write:
            path = self.folder / f"step_{step:06d}.png"
            save_pair_grid(teacher, student, path)
            record["grid"] = str(path)
        return record


def to_pil(images: Tensor) -> List:
    from PIL import Image

    array = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]


def save_pair_grid(teacher: Tensor, student: Tensor, path: Path, columns: Optional[int] = None,
                   separator: bool = False, upscale: int = 1) -> None:
    """Teacher images ``(B, 3, H, W)`` in [0, 1] in rows above the student's, as one PNG at ``path`` (atomic
    write): ``columns`` a row (default ``B``: one row each), a blank row between them with ``separator``, each
    image enlarged ``upscale`` times (see :func:`linvision.sample.output.pair_grid`). The distillation job's
    step grids and the demo's sample grids."""
    from linvision.sample.output import pair_grid

    from .checkpoint import atomic_write

    grid = pair_grid(teacher, student, columns, separator=separator, upscale=upscale)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


__all__ = ["SampleComparer", "draw", "save_pair_grid", "swap_denoiser", "to_pil"]
