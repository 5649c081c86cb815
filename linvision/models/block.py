"""The transformer block of the linvision ViT: timm's pre-norm block with a linvision mixer as attention."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple, Type

from timm.layers import LayerNorm, LayerScale, Mlp, register_notrace_module
from torch import Tensor, nn

from ..kernels.validation import check_choice
from ..mixers import TokenMixer, create_mixer
from .drop_path import DropPath
from .glumbconv import GLUMBConv

MLP_LAYERS = ("mlp", "glumbconv")


def build_ffn(mlp_layer: str, dim: int, mlp_ratio: float, act_layer: Type[nn.Module] = nn.GELU) -> nn.Module:
    """The feed-forward of a block: timm's ``Mlp`` (``"mlp"``) or SANA's :class:`GLUMBConv` (``"glumbconv"``),
    hidden width ``int(dim·mlp_ratio)``."""
    check_choice("mlp_layer", mlp_layer, MLP_LAYERS)
    if mlp_layer == "glumbconv":
        return GLUMBConv(dim, int(dim * mlp_ratio))
    return Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)


def apply_ffn(ffn: nn.Module, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int = 0) -> Tensor:
    """``ffn(x)``, with the token grid for a :class:`GLUMBConv` (its depth-wise conv needs it)."""
    return ffn(x, hw, num_prefix_tokens) if isinstance(ffn, GLUMBConv) else ffn(x)

# Under timm's FX feature extraction (``create_feature_extractor``, ``get_graph_node_names``) every mixer is one
# opaque node: its validation, chunked loops and kernels are data-dependent Python, not a static graph.
register_notrace_module(TokenMixer)


class MixerBlock(nn.Module):
    """``x (B, N, C)`` → ``(B, N, C)``, with ``N = num_prefix_tokens + h·w``:

    ``x = x + drop_path(ls1(attn(norm1(x), hw, num_prefix_tokens)))``;
    ``x = x + drop_path(ls2(mlp(norm2(x))))``.

    ``attn`` is ``create_mixer(mixer, dim, num_heads, **mixer_kwargs)``. Submodule names are those of timm's
    ``vision_transformer.Block`` (``norm1``, ``attn``, ``ls1``, ``norm2``, ``mlp``, ``ls2``), so with a
    ``qkv``/``proj`` mixer a timm ViT block's weights load as they are.

    ``mlp_layer``: ``"mlp"`` (timm's two-layer MLP) or ``"glumbconv"`` (SANA's Mix-FFN,
    :class:`~linvision.models.glumbconv.GLUMBConv` with ``hidden = int(dim·mlp_ratio)``; SANA uses 2.5), which
    also gets ``hw`` and ``num_prefix_tokens``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mixer: str = "softmax",
        mixer_kwargs: Optional[Mapping[str, Any]] = None,
        mlp_ratio: float = 4.0,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        norm_layer: Type[nn.Module] = LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        mlp_layer: str = "mlp",
    ):
        super().__init__()
        self.mlp_layer = check_choice("mlp_layer", mlp_layer, MLP_LAYERS)
        self.norm1 = norm_layer(dim)
        self.attn = create_mixer(mixer, dim, num_heads, **dict(mixer_kwargs or {}))
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = build_ffn(mlp_layer, dim, mlp_ratio, act_layer)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int = 0) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), hw, num_prefix_tokens)))
        y = apply_ffn(self.mlp, self.norm2(x), hw, num_prefix_tokens)
        return x + self.drop_path2(self.ls2(y))


__all__ = ["MLP_LAYERS", "MixerBlock", "apply_ffn", "build_ffn"]
