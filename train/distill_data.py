"""The distillation job's data: examples, their conditions, VAE latents and the optional on-disk cache.

Sources (``data.source``):

- ``images``: every image under ``root`` (recursive, sorted) with a caption from ``captions`` (JSONL lines
  ``{"file": "a/b.jpg", "text": "..."}``; ``image``/``file_name`` and ``caption`` are accepted too) or from a
  sidecar ``a/b.txt``. A missing caption is an error naming the image.
- ``classes``: ``root/<class>/*.jpg`` with class ids from ``class_ids`` or the sorted folder order.
- ``digits``: scikit-learn's 1797 handwritten digits (8×8 grey, upsampled bicubically, as RGB) and labels.
- ``teacher``: the teacher's own samples for ``prompts``/``class_labels`` × ``samples_per_condition`` seeds
  (CLEAR's self-generated data), drawn once and cached.

Images become ``(3, R, R)`` in [-1, 1] (short side resized to R bicubically, centre or seeded random
crop, seeded flip), then VAE latents ``(C, R/f, R/f)``: the posterior mean and std, scaled like the
pipelines do (``(z − shift_factor)·scaling_factor``), from which each step draws with its own generator.
With ``cache_dir`` the latents (and text embeddings, plus the empty prompt's for dropout) are computed
once by the main process into ``latents.safetensors``/``text.safetensors`` beside a ``cache.json``
fingerprint; a cache whose fingerprint differs is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from linvision.distill.conditioning import Condition, Conditioner, concat, select

from .checkpoint import atomic_write
from .config import ConfigError
from .distill_config import DataSection
from .rng import sample_seed

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_FORMAT = 1


@dataclass
class Record:
    """One example: an image file or digit pixels (or a teacher seed) and its caption or class label."""

    image: Optional[str] = None
    pixels: Optional[np.ndarray] = None
    text: Optional[str] = None
    label: Optional[int] = None
    seed: Optional[int] = None


# --- listing ------------------------------------------------------------------------------------------------


def _captions(d: DataSection, root: Path, files: List[Path]) -> List[str]:
    if d.captions is None:
        texts = []
        for f in files:
            side = f.with_suffix(".txt")
            if not side.is_file():
                raise ConfigError(f"no caption for {f}: expected {side} (or set data.captions to a JSONL file)")
            texts.append(side.read_text().strip())
        return texts
    path = Path(d.captions)
    path = path if path.is_file() else root / d.captions
    if not path.is_file():
        raise ConfigError(f"data.captions: no file {d.captions}")
    table = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        name = next((row[k] for k in ("file", "image", "file_name") if k in row), None)
        text = next((row[k] for k in ("text", "caption") if k in row), None)
        if name is None or text is None:
            raise ConfigError(f"{path}:{n}: a caption line needs 'file' and 'text'")
        table[str(Path(name))] = str(text)
    missing = [str(f.relative_to(root)) for f in files if str(f.relative_to(root)) not in table]
    if missing:
        raise ConfigError(f"{path} has no caption for {len(missing)} image(s), e.g. {missing[:3]}")
    return [table[str(f.relative_to(root))] for f in files]


def list_records(d: DataSection, seed: int = 0) -> List[Record]:
    """The examples of ``d.source`` (at most ``d.max_samples``), in a fixed order."""
    if d.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
        records = [Record(pixels=p, label=int(t)) for p, t in zip(pixels, digits.target)]
    elif d.source == "teacher":
        conds = [dict(text=p) for p in d.prompts] or [dict(label=int(c)) for c in d.class_labels]
        records = [Record(seed=sample_seed(seed, i, k), **c) for i, c in enumerate(conds)
                   for k in range(d.samples_per_condition)]
    else:
        root = Path(d.root)
        if not root.is_dir():
            raise ConfigError(f"data.root {root} is not a directory")
        if d.source == "classes":
            folders = sorted(p for p in root.iterdir() if p.is_dir())
            if not folders:
                raise ConfigError(f"data.root {root} has no class sub-folders")
            unknown = sorted(set(d.class_ids) - {f.name for f in folders})
            if unknown:
                raise ConfigError(f"data.class_ids names folders that do not exist: {unknown}")
            ids = {f.name: (d.class_ids[f.name] if d.class_ids else i) for i, f in enumerate(folders)}
            records = [Record(image=str(p), label=int(ids[f.name])) for f in folders for p in sorted(f.rglob("*"))
                       if p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            records = [Record(image=str(f), text=t) for f, t in zip(files, _captions(d, root, files))]
    if not records:
        raise ConfigError(f"data.source {d.source!r} gave no examples")
    return records[: d.max_samples] if d.max_samples else records


# --- pixels and latents -------------------------------------------------------------------------------------


def load_pixels(record: Record, resolution: int, center_crop: bool = True, flip: bool = False,
                rng: Optional[np.random.Generator] = None) -> Tensor:
    """``(3, R, R)`` float32 in [-1, 1]: short side to R (bicubic), crop (centre or from ``rng``), flip."""
    image = Image.fromarray(record.pixels).convert("RGB") if record.pixels is not None else \
        Image.open(record.image).convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.BICUBIC)
    dx, dy = size[0] - resolution, size[1] - resolution
    if center_crop or rng is None:
        left, top = dx // 2, dy // 2
    else:
        left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1).contiguous()


@torch.no_grad()
def encode_pixels(vae, pixels: Tensor):
    """``(mean, std)`` of the scaled latent posterior for images ``(B, 3, R, R)`` in [-1, 1]; fp32.

    A deterministic VAE (SANA's ``AutoencoderDC``: ``encode(...).latent``) gives a zero ``std``."""
    param = next(vae.parameters())
    encoded = vae.encode(pixels.to(device=param.device, dtype=param.dtype))
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = vae.config.scaling_factor
    dist = getattr(encoded, "latent_dist", None)
    if dist is None:
        mean = (encoded.latent.float() - shift) * scale
        return mean, torch.zeros_like(mean)
    return ((dist.mean.float() - shift) * scale), dist.std.float() * scale


class PixelDataset(Dataset):
    """Key ``(epoch, index)`` → ``{"index", "pixels" (3, R, R)}``; crop and flip seeded by (seed, epoch, index)."""

    def __init__(self, records: Sequence[Record], d: DataSection, seed: int):
        self.records, self.d, self.seed = list(records), d, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key):
        epoch, index = key
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
        flip = self.d.random_flip > 0 and rng.random() < self.d.random_flip
        pixels = load_pixels(self.records[index], self.d.resolution, self.d.center_crop, flip, rng)
        return {"index": index, "pixels": pixels}


class LatentDataset(Dataset):
    """Key ``(epoch, index)`` → ``{"index", "mean" (C, h, w)[, "std"]}`` from cached latents."""

    def __init__(self, mean: Tensor, std: Optional[Tensor]):
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, key):
        index = key[1]
        item = {"index": index, "mean": self.mean[index]}
        if self.std is not None:
            item["std"] = self.std[index]
        return item


# --- conditions ---------------------------------------------------------------------------------------------


class Conditions:
    """Per-example conditions: class labels, prompts encoded on demand, or cached embeddings."""

    def __init__(self, records: Sequence[Record], conditioner: Conditioner, cached: Optional[Condition] = None,
                 null: Optional[Condition] = None):
        self.conditioner = conditioner
        self.texts = [r.text for r in records]
        self.labels = [r.label for r in records]
        self.text = conditioner.text
        self.cached = cached
        self.null_cond = null
        if not self.text and any(l is None for l in self.labels):
            raise ConfigError(f"a {conditioner.family} denoiser is class-conditional: every example needs a label "
                              "(data.source classes, digits, or teacher with class_labels)")
        if self.text and any(t is None for t in self.texts):
            raise ConfigError(f"a {conditioner.family} denoiser is text-conditional: every example needs a caption "
                              "(data.source images, or teacher with prompts)")

    def null(self, device=None) -> Condition:
        """The condition of one unconditional example (null class / empty prompt)."""
        if not self.text:
            return self.conditioner.labels([self.conditioner.null_label()], device)
        if self.null_cond is None:
            self.null_cond = self.conditioner.encode_prompts([""], device)
        return {k: v.to(device) if device is not None else v for k, v in self.null_cond.items()}

    def batch(self, indices: Sequence[int], device=None, drop: Optional[Tensor] = None) -> Condition:
        """The conditions of examples ``indices``; rows where ``drop (B,)`` is True get the null condition."""
        indices = [int(i) for i in indices]
        if not self.text:
            cond = self.conditioner.labels([self.labels[i] for i in indices], device)
        elif self.cached is not None:
            cond = {k: v.to(device) if device is not None else v for k, v in select(self.cached, indices).items()}
        else:
            cond = self.conditioner.encode_prompts([self.texts[i] for i in indices], device)
        if drop is not None and bool(drop.any()):
            null = self.null(device)
            rows = drop.to(cond[next(iter(cond))].device)
            cond = {k: torch.where(rows.reshape(-1, *([1] * (v.dim() - 1))), null[k].expand_as(v), v)
                    for k, v in cond.items()}
        return cond


# --- the cache ----------------------------------------------------------------------------------------------


def fingerprint(model: str, d: DataSection, records: Sequence[Record]) -> str:
    """A hash of everything the cached tensors depend on."""
    local = Path(model)
    weights = sorted((str(f.relative_to(local)), f.stat().st_size, f.stat().st_mtime_ns)
                     for f in local.glob("*/*.safetensors")) if local.is_dir() else []  # a retrained local teacher
    keys = {"format": CACHE_FORMAT, "model": model, "weights": weights, "source": d.source, "resolution": d.resolution,
            "center_crop": d.center_crop, "max_sequence_length": d.max_sequence_length, "n": len(records),
            "teacher": [d.teacher_steps, d.teacher_guidance] if d.source == "teacher" else None,
            "items": [[r.image, r.text, r.label, r.seed] for r in records]}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_cache(folder: Path, stamp: str) -> Optional[Dict[str, Dict[str, Tensor]]]:
    """``{"latents": {...}, "text": {...}}`` if ``folder`` holds a cache with fingerprint ``stamp``."""
    manifest = folder / "cache.json"
    if not manifest.is_file() or json.loads(manifest.read_text()).get("fingerprint") != stamp:
        return None
    out = {"latents": load_file(str(folder / "latents.safetensors"))}
    text = folder / "text.safetensors"
    out["text"] = load_file(str(text)) if text.is_file() else {}
    return out


def write_cache(folder: Path, stamp: str, latents: Dict[str, Tensor], text: Dict[str, Tensor]) -> None:
    """Write the cache files atomically, the manifest last."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "latents.safetensors", lambda tmp: save_file({k: v.contiguous() for k, v in latents.items()},
                                                                      str(tmp)))
    if text:
        atomic_write(folder / "text.safetensors", lambda tmp: save_file({k: v.contiguous() for k, v in text.items()},
                                                                       str(tmp)))
    manifest = json.dumps({"fingerprint": stamp, "format": CACHE_FORMAT, "count": len(next(iter(latents.values())))})
    atomic_write(folder / "cache.json", lambda tmp: tmp.write_text(manifest))


def encode_all(pipe, records: Sequence[Record], d: DataSection, batch: int = 8, progress=None) -> Dict[str, Tensor]:
    """Latent posterior ``mean``/``std`` of every record's (centre-cropped) image, stacked ``(N, C, h, w)``."""
    means, stds = [], []
    for i in range(0, len(records), batch):
        pixels = torch.stack([load_pixels(r, d.resolution, d.center_crop) for r in records[i:i + batch]])
        mean, std = encode_pixels(pipe.vae, pixels)
        means.append(mean.cpu())
        stds.append(std.cpu())
        if progress is not None:
            progress.update(len(pixels))
    return {"mean": torch.cat(means), "std": torch.cat(stds)}


def encode_texts(conditioner: Conditioner, records: Sequence[Record], batch: int = 16) -> Dict[str, Tensor]:
    """Text embeddings of every caption, stacked, plus the empty prompt's under ``null.<key>``."""
    parts = [conditioner.encode_prompts([r.text for r in records[i:i + batch]]) for i in range(0, len(records), batch)]
    out = {k: v.cpu() for k, v in concat(parts).items()}
    out.update({f"null.{k}": v.cpu() for k, v in conditioner.encode_prompts([""]).items()})
    return out


def split_text_cache(text: Dict[str, Tensor]):
    """``(per-example condition, null condition)`` of a text cache (None, None when empty)."""
    if not text:
        return None, None
    cond = {k: v for k, v in text.items() if not k.startswith("null.")}
    null = {k[5:]: v for k, v in text.items() if k.startswith("null.")}
    return cond, null or None


__all__ = ["Conditions", "LatentDataset", "PixelDataset", "Record", "encode_all", "encode_pixels", "encode_texts",
           "fingerprint", "list_records", "load_pixels", "read_cache", "split_text_cache", "write_cache"]
