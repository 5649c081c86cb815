"""Writing the results: one PNG per image, a grid PNG and a JSON of settings and timings."""
from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from PIL import Image

if TYPE_CHECKING:
    from torch import Tensor


def make_grid(images: Sequence[Image.Image], columns: int = 0, pad: int = 2) -> Image.Image:
    """All ``images`` on one white canvas, ``columns`` per row (default ⌈√n⌉), cells sized to the largest."""
    if not images:
        raise ValueError("no images to put on a grid")
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cw, ch = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new("RGB", (cols * cw + (cols + 1) * pad, rows * ch + (rows + 1) * pad), "white")
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid.paste(img.convert("RGB"), (pad + c * (cw + pad), pad + r * (ch + pad)))
    return grid


def tensor_images(images: "Tensor", upscale: int = 1) -> List[Image.Image]:
    """``images (B, 3, H, W)`` in [0, 1] (clamped) → RGB PIL images, enlarged ``upscale`` times (nearest)."""
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    out = [Image.fromarray(a) for a in array]
    return [i.resize((i.width * upscale, i.height * upscale), Image.NEAREST) for i in out] if upscale > 1 else out


def pair_grid(teacher: "Tensor", student: "Tensor", columns: Optional[int] = None, separator: bool = False,
              upscale: int = 1) -> Image.Image:
    """Teacher images ``(B, 3, H, W)`` in rows above the student's (``columns`` a row, default ``B``: one row
    each), with a blank row between them when ``separator``; for side-by-side comparisons from the same noise."""
    columns = columns or len(teacher)
    t, s = tensor_images(teacher, upscale), tensor_images(student, upscale)
    blank = [Image.new("RGB", t[0].size, "white")] * columns if separator else []
    return make_grid(t + blank + s, columns=columns)


def write_outputs(folder: str, prefix: str, images: List[Image.Image], records: List[Dict[str, Any]],
                  report: Dict[str, Any], grid: bool = True) -> Dict[str, Any]:
    """Save PNGs (``{prefix}_{k:03d}_seed{seed}.png``), ``grid.png`` and ``sample.json``; returns the report."""
    os.makedirs(folder, exist_ok=True)
    for k, (img, rec) in enumerate(zip(images, records)):
        name = f"{prefix}_{k:03d}_seed{rec['seed']}.png"
        img.save(os.path.join(folder, name))
        rec["file"] = name
    report = dict(report, images=records)
    if grid:
        make_grid(images).save(os.path.join(folder, "grid.png"))
        report["grid"] = "grid.png"
    with open(os.path.join(folder, "sample.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    return report


__all__ = ["make_grid", "pair_grid", "tensor_images", "write_outputs"]
