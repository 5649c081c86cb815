"""linvision: bidirectional and 2D linear-attention blocks for vision and diffusion.

>>> import linvision
>>> m = linvision.create_mixer("linear", dim=64, num_heads=4)
>>> y = m(x, hw=(h, w))        # x, y: (B, h*w, C)
"""
from .mixers import create_mixer, list_mixers, mixer_class
from . import models  # noqa: F401  (importing registers the linvit_* models in timm)

__version__ = "0.1.0"
__all__ = ["create_mixer", "list_mixers", "mixer_class", "__version__"]
