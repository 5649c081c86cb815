"""Models built from linvision mixers. Importing this package registers them in timm.

- :mod:`.vit`: ``linvit_{tiny,small,base}_patch16_224`` (``timm.create_model(name, mixer=...)``).
- :mod:`.nalaformer`: ``nalaformer_{xt,t,s,b,l}``, NaLaFormer's hierarchical backbone.
- :mod:`.plstm_vis`: ``plstm_vis_{t,s,b}``, the pLSTM vision models (P/D blocks, corner pooling).
- :mod:`.infvit`: ``infvit_4l_patch16_224``, ``infvit_pure_4l_patch16_224``, InfSA's 4-layer InfViT.
- :mod:`.care`: ``care_s{0,1,2}``, CARE Transformer's mobile backbone (linear attention + convs).
- :mod:`.lion_vit`: ``lion_vit_{tiny,small,base}_patch16_224``, LION's ViTs (``mask_type``).
- :mod:`.vig`: ``vig_{tiny,small,base}_patch16_224``, ViG's plain GLA models.
- :mod:`.dit`: ``LinVisionDiT``, a class-conditional DiT with any mixer and an MLP or SANA's Mix-FFN.
- :mod:`.layout`: per-layer mixer names and options (shared with :func:`linvision.timm.linearize`).
"""
from .block import MixerBlock
from .dit import LinVisionDiT
from .layout import layer_options, resolve_mixers
from .vit import LinVisionTransformer
from .nalaformer import NaLaFormer
from .plstm_vis import PLSTMVisionModel
from . import infvit  # noqa: F401  (registers the infvit_* models)
from .care import CARETransformer
from . import lion_vit  # noqa: F401  (registers the lion_vit_* models)
from . import vig  # noqa: F401  (registers the vig_* models)

__all__ = ["CARETransformer", "LinVisionDiT", "LinVisionTransformer", "MixerBlock", "NaLaFormer", "PLSTMVisionModel", "layer_options", "resolve_mixers"]
