"""Datasets, transforms, the seeded per-epoch sampler and the data loaders of the classification job.

Sources:

- ``folder``: an ImageFolder tree in ImageNet's layout, ``root/train/<class>/*.JPEG`` and
  ``root/val/<class>/*.JPEG`` (the class list comes from the train split and must match val's).
- ``digits``: scikit-learn's handwritten digits (1797 real 8x8 grey images, 10 classes; they ship with the
  package, so this runs offline anywhere), as RGB images that the transforms upsample to ``img_size``. The
  train/val split is stratified and fixed (``random_state=0``).

Loading is deterministic and resumable: :class:`EpochSampler` yields ``(epoch, index)`` keys in an order that
is a pure function of ``(seed, epoch)``, already sharded over processes and able to start at any batch, and
:class:`SeededAugment` transforms each sample under generators seeded from ``(seed, epoch, index)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data import auto_augment
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import three_augment_transform
from .config import Config, ConfigError, DataConfig
from .rng import sample_seed, seeded


class DigitsImages(Dataset):
    """scikit-learn's handwritten digits as ``(PIL RGB image 8x8, label)``; ``split`` is 'train' or 'val'."""

    def __init__(self, split: str, val_fraction: float = 0.2, transform: Optional[Callable] = None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        digits = load_digits()
        order = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(order, test_size=val_fraction, stratify=digits.target, random_state=0)
        chosen = np.sort(train_idx if split == "train" else val_idx)
        pixels = (digits.images[chosen] * (255.0 / 16.0)).round().astype(np.uint8)  # values 0..16 -> 0..255
        self.images = [Image.fromarray(p).convert("RGB") for p in pixels]
        self.targets = [int(t) for t in digits.target[chosen]]
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class SeededAugment(Dataset):
    """Wraps a dataset so that item ``(epoch, index)`` is ``base[index]`` drawn under generators seeded by
    ``(seed, epoch, index)`` (python, numpy and torch-CPU; the caller's generator states are restored)."""

    def __init__(self, base: Dataset, seed: int):
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        with seeded(sample_seed(self.seed, epoch, index)):
            return self.base[index]


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys: this process's share of one epoch, from batch ``start_batch`` on.

    Training (``shuffle=True``): a permutation from ``torch.Generator().manual_seed(seed + epoch)``, cut to a
    multiple of ``num_replicas``; process ``rank`` takes every ``num_replicas``-th index from ``rank``; its
    share is cut to whole groups of ``batch_size * multiple_of`` (the micro-batches of whole optimizer
    steps). Evaluation (``shuffle=False``): indices in order, every sample exactly once over all processes
    (no padding, no cut), so metrics summed over processes are exact.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, rank: int = 0, num_replicas: int = 1,
                 shuffle: bool = True, multiple_of: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.num_replicas, self.shuffle, self.multiple_of = rank, num_replicas, shuffle, multiple_of
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch (data order) and the first batch to yield (resuming mid-epoch)."""
        self.epoch, self.start_batch = epoch, start_batch

    def num_batches(self) -> int:
        """Batches per epoch for this process (from batch 0)."""
        if not self.shuffle:
            return math.ceil(len(range(self.rank, self.size, self.num_replicas)) / self.batch_size)
        group = self.batch_size * self.multiple_of
        return (self.size // self.num_replicas) // group * self.multiple_of

    def _indices(self) -> List[int]:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.num_replicas))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        share = order[: self.size // self.num_replicas * self.num_replicas][self.rank :: self.num_replicas]
        return share[: self.num_batches() * self.batch_size]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for index in self._indices()[self.start_batch * self.batch_size :]:
            yield self.epoch, index

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start_batch * self.batch_size)


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's RandAugment posterize, also for 0 bits kept (a black image, as Pillow < 13 gave).

    timm's increasing-magnitude policies (``...-inc1``, DeiT's ``rand-m9-mstd0.5-inc1``) ask for 0 bits at full
    magnitude, which Pillow 13 rejects ("bits must be between or equal to 1 and 8") mid-epoch.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform: Callable) -> Callable:
    """Point every RandAugment/AutoAugment posterize op inside ``transform`` at :func:`posterize_any_bits`
    (per op instance; timm's module is left unchanged)."""
    stack = [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, (list, tuple)):
            stack.extend(t)
        elif isinstance(t, auto_augment.AugmentOp) and t.aug_fn is auto_augment.posterize:
            t.aug_fn = posterize_any_bits
        else:
            stack.extend(c for c in (getattr(t, a, None) for a in ("transforms", "ops", "policy")) if c is not None)
    return transform


def build_transforms(d: DataConfig, is_training: bool) -> Callable:
    """timm's ``create_transform`` with the config's augmentation (train) or resize/centre-crop (eval);
    with ``data.three_augment`` the training transform is DeiT-III's 3-Augment
    (:func:`linvision.train.augment.three_augment_transform`)."""
    if not is_training:
        return create_transform(d.img_size, is_training=False, interpolation=d.interpolation, mean=tuple(d.mean),
                                std=tuple(d.std), crop_pct=d.crop_pct)
    if d.three_augment:
        return three_augment_transform(d)
    try:
        transform = create_transform(
            d.img_size,
            is_training=True,
            scale=tuple(d.scale),
            ratio=tuple(d.ratio),
            hflip=d.hflip,
            color_jitter=d.color_jitter if d.color_jitter is not None else 0.0,
            auto_augment=d.auto_augment,
            interpolation=d.interpolation,
            mean=tuple(d.mean),
            std=tuple(d.std),
            re_prob=d.reprob,
            re_mode=d.remode,
            re_count=d.recount,
        )
    except (AssertionError, ValueError, KeyError) as err:
        raise ConfigError(f"data: timm cannot build the training transform (auto_augment={d.auto_augment!r}, "
                          f"remode={d.remode!r}, interpolation={d.interpolation!r}): {err}") from None
    return _fix_posterize(transform)


def _folder_split(d: DataConfig, split: str, transform: Callable) -> Dataset:
    from torchvision.datasets import ImageFolder

    path = Path(d.root) / split
    if not path.is_dir():
        raise ConfigError(f"data folder {path} does not exist: data.root must hold '{d.train_split}/' and "
                          f"'{d.val_split}/' with one sub-directory of images per class (ImageNet layout)")
    try:
        return ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise ConfigError(f"data folder {path}: {err}") from None


def _limit(dataset: Dataset, limit: Optional[int]) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, range(limit))


@dataclass
class Splits:
    """The train and val datasets (train wrapped in :class:`SeededAugment`) and the class names."""

    train: Dataset
    val: Dataset
    classes: Sequence[str]


def build_datasets(cfg: Config) -> Splits:
    """Train (augmented, seeded per sample) and val datasets for ``cfg.data``."""
    d = cfg.data
    train_tf, val_tf = build_transforms(d, True), build_transforms(d, False)
    if d.source == "digits":
        train, val = DigitsImages("train", d.val_fraction, train_tf), DigitsImages("val", d.val_fraction, val_tf)
    else:
        train, val = _folder_split(d, d.train_split, train_tf), _folder_split(d, d.val_split, val_tf)
        if list(train.classes) != list(val.classes):
            raise ConfigError(f"class folders differ between {d.train_split}/ ({len(train.classes)}) and "
                              f"{d.val_split}/ ({len(val.classes)})")
    classes = list(train.classes)
    return Splits(SeededAugment(_limit(train, d.max_train_samples), cfg.train.seed),
                  _limit(val, d.max_val_samples), classes)


class _Indexed(Dataset):
    """Training view: ``(epoch, index)`` keys → ``(*base[key], index)``, so each batch carries its samples' dataset
    indices (the keys of the per-sample drop-path, :func:`linvision.models.drop_path.per_sample_drop_path`)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]):
        return (*self.base[key], key[1])


class _Plain(Dataset):
    """Evaluation view: ``(epoch, index)`` keys → ``base[index]`` (no seeding needed, no randomness)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]):
        return self.base[key[1]]


def build_loader(dataset: Dataset, sampler: EpochSampler, batch_size: int, num_workers: int, seed: int,
                 pin_memory: bool = False, train: bool = True) -> DataLoader:
    """A DataLoader over ``sampler``'s keys: batches ``(x, y, index)`` for training (``index``: the samples' dataset
    indices), ``(x, y)`` for evaluation. It has its own generator, so creating an iterator never draws from the
    global torch generator (which would shift the training randomness after a resume)."""
    return DataLoader(
        _Indexed(dataset) if train else _Plain(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


__all__ = ["DigitsImages", "EpochSampler", "SeededAugment", "Splits", "build_datasets", "build_loader",
           "build_transforms"]
