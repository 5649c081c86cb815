"""diffusers integration: adapters that put linvision attention into UNet, DiT, PixArt, SANA, SD3 and FLUX, and the
:class:`Family` objects that describe each denoiser kind (:mod:`linvision.diffusers.families`).

See :mod:`linvision.diffusers.adapter` for the object and its file layout, and
:mod:`linvision.diffusers.convert` for the published LinFusion and CLEAR checkpoints.
"""
from .adapter import Adapter, DiffusersAdapter
from .convert import load_clear, load_linfusion
from .families import FAMILIES, Family, denoiser_of, family_named, family_of
from .geometry import LatentGeometry
from .joint import JOINT_MECHANISMS

__all__ = ["Adapter", "DiffusersAdapter", "FAMILIES", "Family", "JOINT_MECHANISMS", "LatentGeometry", "denoiser_of",
           "family_named", "family_of", "load_clear", "load_linfusion"]
