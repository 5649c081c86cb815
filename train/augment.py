"""DeiT-III's 3-Augment (Touvron et al., "DeiT III: Revenge of the ViT", 2022) as a training transform.

Written after the description in facebookresearch/deit ``augment.py::new_data_aug_generator`` (``--ThreeAugment``,
``--src``), which the pLSTM-Vis ImageNet recipe also uses (``auto_augment: "3a"``). Per image:

1. primary: ``RandomResizedCrop(img_size, scale, ratio)`` with the configured interpolation, or with
   ``simple_random_crop`` (DeiT-III's ``--src``) a resize of the shorter side to ``img_size`` and a random
   ``img_size`` crop with 4 px reflect padding; then a horizontal flip with probability ``hflip``;
2. secondary: exactly one of grayscale, solarization (threshold 128) or Gaussian blur (radius uniform in
   [0.1, 2.0]), chosen uniformly; then ``ColorJitter(cj, cj, cj)`` when ``color_jitter`` is set and non-zero;
3. ``ToTensor``, ``Normalize(mean, std)``, and timm's random erasing when ``reprob > 0`` (DeiT-III: 0).

All randomness comes from python's ``random`` and torch's global generator, so
:class:`linvision.train.data.SeededAugment` makes every sample's augmentation a function of (seed, epoch, index).
"""
from __future__ import annotations

import random
from typing import Callable, Tuple

from PIL import Image, ImageFilter, ImageOps
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
from torchvision import transforms

from .config import DataConfig

SOLARIZE_THRESHOLD = 128  # PIL's ImageOps.solarize default, as DeiT-III
BLUR_RADIUS = (0.1, 2.0)  # DeiT-III's GaussianBlur radius_min, radius_max
SIMPLE_CROP_PADDING = 4  # DeiT-III's --src: RandomCrop(padding=4, padding_mode='reflect')


class GraySolarizeOrBlur:
    """3-Augment's secondary op: one of grayscale, solarize or Gaussian blur, chosen uniformly per image."""

    OPS = ("grayscale", "solarize", "blur")

    def __init__(self, solarize_threshold: int = SOLARIZE_THRESHOLD, blur_radius: Tuple[float, float] = BLUR_RADIUS):
        self.solarize_threshold = solarize_threshold
        self.blur_radius = tuple(blur_radius)

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.apply(img, self.OPS[random.randrange(len(self.OPS))])

    def apply(self, img: Image.Image, op: str) -> Image.Image:
        """``img`` under the op named ``op`` (the blur radius is still drawn from python's ``random``)."""
        if op == "grayscale":
            return ImageOps.grayscale(img).convert(img.mode)  # luma copied to every channel
        if op == "solarize":
            return ImageOps.solarize(img, threshold=self.solarize_threshold)
        if op == "blur":
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.blur_radius)))
        raise ValueError(f"unknown op {op!r}; expected one of {self.OPS}")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(solarize_threshold={self.solarize_threshold}, "
                f"blur_radius={self.blur_radius})")


def three_augment_transform(d: DataConfig) -> Callable:
    """The 3-Augment training transform for ``d`` (PIL image → normalised float tensor)."""
    if d.simple_random_crop:
        primary = [transforms.Resize(d.img_size, interpolation=str_to_interp_mode(d.interpolation)),
                   transforms.RandomCrop(d.img_size, padding=SIMPLE_CROP_PADDING, padding_mode="reflect")]
    else:
        primary = [RandomResizedCropAndInterpolation(d.img_size, scale=tuple(d.scale), ratio=tuple(d.ratio),
                                                     interpolation=d.interpolation)]
    if d.hflip > 0:
        primary.append(transforms.RandomHorizontalFlip(p=d.hflip))
    secondary = [GraySolarizeOrBlur()]
    if d.color_jitter:
        secondary.append(transforms.ColorJitter(d.color_jitter, d.color_jitter, d.color_jitter))
    final = [transforms.ToTensor(), transforms.Normalize(mean=tuple(d.mean), std=tuple(d.std))]
    if d.reprob > 0:
        final.append(RandomErasing(d.reprob, mode=d.remode, max_count=d.recount, device="cpu"))
    return transforms.Compose(primary + secondary + final)


__all__ = ["GraySolarizeOrBlur", "three_augment_transform"]
