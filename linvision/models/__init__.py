"""Models built from linvision mixers. Importing this package registers them in timm.

- :mod:`.vit`: ``linvit_{tiny,small,base}_patch16_224`` (``timm.create_model(name, mixer=...)``).
- :mod:`.layout`: per-layer mixer names and options (shared with :func:`linvision.timm.linearize`).
"""
from .block import MixerBlock
from .layout import layer_options, resolve_mixers
from .vit import LinVisionTransformer

__all__ = ["LinVisionTransformer", "MixerBlock", "layer_options", "resolve_mixers"]
