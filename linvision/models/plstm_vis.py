"""pLSTM-Vis: the pLSTM vision models (alternating P-/D-mode blocks, corner pooling) as timm models.

Paper: Pöppel et al., "pLSTM: parallelizable Linear Source Transition Mark networks", arXiv 2506.11997.
Official code followed: ``ml-jku/plstm`` at commit ``a404ff3`` — ``src/plstm/torch/vision_model.py::
pLSTMVisionModel``, ``vision_blocks.py::pLSTMVisionBlock1``, ``blocks.py::PostUpProjectionBlock``,
``block_stack.py::BlockStack``, ``vision_util.py::{VitPatchEmbed, VitPosEmbed2d, interpolate_sincos}``,
``norm.py::RMSNorm`` — configured as ``ml-jku/plstm_experiments`` at ``ac539b6``:
``config/model/plstm_vision.yaml`` with ``plstm_vis_{t,s,b}.yaml`` (T: dim 192, 3 heads; S: 384, 6; B: 768,
12; 6 vision blocks each) and the drop-path rates of ``config/experiments/spl/imagenet1k_*_deit3_{t,s,b}``
(T 0.0, S 0.05, B 0.1).

>>> import linvision, timm
>>> m = timm.create_model("plstm_vis_t")                          # official: P, D, P, D, … (12 layers)
>>> m = timm.create_model("plstm_vis_t", block_modes="P")         # the P-only ablation
>>> m = timm.create_model("plstm_vis_t", mixer=["plstm"] * 3 + ["softmax"])   # 3 pLSTM : 1 softmax hybrid
>>> m = timm.create_model("plstm_vis_t", features_only=True)      # the 6 vision blocks' outputs, NCHW

Architecture (``(B, 3, H, W)`` → logits)::

    patch_embed   Conv p×p stride p (``proj``) → (B, h, w, D)
    pos_embed     + learnable (1, h0, w0, D) ``embed``, bicubically resampled when (h, w) ≠ (h0, w0)
    block_stack   num_blocks × [block0, block1], each a PostUpProjectionBlock on (B, h·w, D) tokens:
                  x = x + drop_path(interaction_module(norm(x), hw))            RMSNorm, the 2-D mixer
                  x = x + drop_path(downproj(GELU(upproj(norm2(x)))))           D → 4D (rounded up to 64) → D
    norm          RMSNorm (eps 1e-5)
    head          corner pooling: concat(x[0, 0], x[h-1, 0], x[0, w-1], x[h-1, w-1]) (4D) → Linear

The interaction module of layer ``i`` is the ``plstm`` mixer in mode ``block_modes[i % len(block_modes)]``
(official ``block_mode: PD``: block0 P, block1 D). ``mixer=`` takes one linvision mixer name or a per-layer
list (``2·num_blocks`` names or a repeating pattern, :func:`linvision.models.layout.resolve_mixers`), so
layers can be any mixer; ``mixer_kwargs`` as for the linvit models.

Parameter counts at 224² and 1000 classes: T 6,314,404, S 23,272,288, B 89,121,496, identical to the official
``pLSTMVisionModel`` built from the YAML config (the paper's 6.31/23.27/89.12M).

Initialisation as the official config: ``SmallInit`` (normal, std ``1/√(2.5·n)`` with ``n`` the size of
the weight's last axis) for patch embedding, position embedding, up/down projections and the mixer's q/k/v/out
projections; zero biases; RMSNorm scales 1; head ``trunc_normal(std=2e-5)``, zero bias. The official applies
``SmallInit(axis=-1)`` to the patch-embedding conv weight ``(D, C, p, p)``, so ``n`` is the patch width ``p``;
reproduced.

Deviations from the official code:

- Names follow the official modules (``patch_embed.proj``, ``pos_embed.embed``,
  ``block_stack.blocks.{i}.block{0,1}.{norm,norm2,upproj,interaction_module,downproj}``, ``norm.scale``,
  ``head``) except inside ``interaction_module``, which is the linvision ``plstm`` mixer;
  :func:`convert_official_state_dict` maps an official state dict (it is applied automatically to
  ``pretrained``/``checkpoint_path`` loads).
- The mixer's own deviations (any ``hw``; zero padding; chunked linear-time form by default; fp32 gates
  and states) are listed in :mod:`linvision.mixers.plstm`. The official runs the blocks under bf16 autocast;
  here the model runs in the dtype it is given (use autocast for mixed precision).
- The vision block's own drop path (``vblock_drop_path_rate``, 0 in every shipped config) is not
  implemented; the per-sub-block rate (``drop_path_rate``) is, uniform over all layers as in the config.
- timm conventions added: ``global_pool`` (``'corners'`` official, ``'avg'``, ``'max'``, ``''``),
  ``drop_rate``, ``reset_classifier``, ``forward_intermediates``, ``set_grad_checkpointing``,
  ``set_input_size``. ``dynamic_img_size=True`` (default) accepts any multiple of the patch size, as the
  official always interpolates the position embedding; ``False`` requires ``img_size``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..mixers import create_mixer
from ..mixers.plstm import convert_official_state_dict as convert_plstm_layer
from .drop_path import DropPath
from .layout import MixerSpec, layer_options, resolve_mixers

__all__ = ["PLSTMVisionModel", "convert_official_state_dict", "default_cfgs"]

POOL_TYPES = ("corners", "avg", "max", "")


def small_init_(t: Tensor) -> Tensor:
    """The official ``SmallInit(axis=-1)``: ``normal(0, 1/√(2.5·t.shape[-1]))`` in place."""
    with torch.no_grad():
        return t.normal_(0.0, 1.0 / math.sqrt(2.5 * t.shape[-1]))


class RMSNorm(nn.Module):
    """``F.rms_norm`` over the last dim with a ``scale`` (official name), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale.float(), self.eps).to(x.dtype)


class PatchEmbed(nn.Module):
    """``proj``: Conv p×p, stride p; ``(B, C, H, W)`` → ``(B, H/p, W/p, D)`` (channels last, as official)."""

    def __init__(self, patch_size: Tuple[int, int], in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        if H % self.patch_size[0] or W % self.patch_size[1]:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).permute(0, 2, 3, 1)


class PosEmbed2d(nn.Module):
    """Learnable ``embed (1, h0, w0, D)`` added to ``(B, h, w, D)``; bicubic resampling for another grid."""

    def __init__(self, grid_size: Tuple[int, int], embed_dim: int):
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(1, *grid_size, embed_dim))

    @staticmethod
    def resample(embed: Tensor, grid: Tuple[int, int]) -> Tensor:
        """The official ``interpolate_sincos``: bicubic ``F.interpolate`` over the grid axes."""
        if tuple(embed.shape[1:3]) == tuple(grid):
            return embed
        out = F.interpolate(embed.permute(0, 3, 1, 2).float(), size=tuple(grid), mode="bicubic")
        return out.permute(0, 2, 3, 1).to(embed.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.resample(self.embed, x.shape[1:3])


class PostUpProjectionBlock(nn.Module):
    """One pLSTM-Vis layer on tokens ``(B, h·w, D)``: mixer sub-block, then the GELU MLP, both pre-norm."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mixer: str,
        mixer_kwargs: Optional[Mapping[str, Any]] = None,
        inner_dim: int = 0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm = RMSNorm(dim, norm_eps)
        self.norm2 = RMSNorm(dim, norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()  # one instance per residual branch, so each draws its own per-sample mask (drop_path.py)
        self.upproj = nn.Linear(dim, inner_dim)
        self.interaction_module = create_mixer(mixer, dim, num_heads, **dict(mixer_kwargs or {}))
        self.downproj = nn.Linear(inner_dim, dim)

    def forward(self, x: Tensor, hw: Tuple[int, int]) -> Tensor:
        x = x + self.drop_path(self.interaction_module(self.norm(x), hw, 0))
        return x + self.drop_path2(self.downproj(F.gelu(self.upproj(self.norm2(x)))))


class VisionBlock(nn.Module):
    """``pLSTMVisionBlock1``: ``block0`` then ``block1`` (official: P-mode, then D-mode)."""

    def __init__(self, block0: PostUpProjectionBlock, block1: PostUpProjectionBlock):
        super().__init__()
        self.block0 = block0
        self.block1 = block1

    def forward(self, x: Tensor, hw: Tuple[int, int]) -> Tensor:
        return self.block1(self.block0(x, hw), hw)


class BlockStack(nn.Module):
    """``blocks``: the vision blocks (official ``BlockStack``)."""

    def __init__(self, blocks: Sequence[VisionBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class PLSTMVisionModel(nn.Module):
    """pLSTM-Vis with timm's model interface; see the module docstring.

    Args:
        img_size, patch_size, in_chans, num_classes: as timm's ViT (``img_size`` sets the position grid).
        embed_dim, num_heads, num_blocks: width, heads, number of vision blocks (2 layers each).
        mixer: one linvision mixer name or a per-layer list (``2·num_blocks`` layers; default ``"plstm"``).
        block_modes: P/D mode of the ``plstm`` layers, a pattern repeated over the layers (official ``"PD"``).
        mixer_kwargs: mixer options (per-mechanism dicts or shared keys); mixers with a ``prefix_mode``
            (``plstm``) default to ``"bypass"``: there are no prefix tokens, so no prefix-token parameters.
        projection_scaling, projection_round: MLP width ``round_up(scaling·dim, round)`` (official 4, 64).
        drop_path_rate: drop path of every sub-block (uniform, as the config). drop_rate: before the head.
        global_pool: ``'corners'`` (official), ``'avg'``, ``'max'`` or ``''``. use_pos_embed: official True.
        dynamic_img_size: accept any multiple of the patch size (True, as the official) or only ``img_size``.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        num_heads: int = 3,
        num_blocks: int = 6,
        mixer: MixerSpec = "plstm",
        block_modes: str = "PD",
        mixer_kwargs: Optional[Mapping[str, Any]] = None,
        projection_scaling: float = 4.0,
        projection_round: int = 64,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        global_pool: str = "corners",
        use_pos_embed: bool = True,
        dynamic_img_size: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if global_pool not in POOL_TYPES:
            raise ValueError(f"unknown global_pool {global_pool!r}; expected one of {POOL_TYPES}")
        depth = 2 * num_blocks
        if not block_modes or set(block_modes) - {"P", "D"} or depth % len(block_modes):
            raise ValueError(f"block_modes must be a P/D pattern whose length divides {depth} layers, got {block_modes!r}")
        self.mixers = tuple(resolve_mixers(mixer, depth))
        self.block_modes = block_modes
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.head_hidden_size = self._pooled_dim(global_pool)
        self.num_prefix_tokens = 0
        self.dynamic_img_size = dynamic_img_size
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False
        inner = int(math.ceil(projection_scaling * embed_dim / projection_round)) * projection_round

        self.patch_embed = PatchEmbed(self.patch_size, in_chans, embed_dim)
        self.pos_embed = PosEmbed2d(self.grid_size, embed_dim) if use_pos_embed else None
        layers = []
        for i, name in enumerate(self.mixers):
            defaults = {"prefix_mode": "bypass"}  # no prefix tokens: no prefix-token parameters
            if name == "plstm":
                defaults["mode"] = block_modes[i % len(block_modes)]
            layers.append(
                PostUpProjectionBlock(
                    embed_dim, num_heads, name, layer_options(name, mixer_kwargs, defaults), inner,
                    drop_path_rate, norm_eps,
                )
            )  # fmt: skip
        self.block_stack = BlockStack([VisionBlock(layers[2 * i], layers[2 * i + 1]) for i in range(num_blocks)])
        self.norm = RMSNorm(embed_dim, norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        reduction = self.patch_size[0]
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=reduction, module=f"block_stack.blocks.{i}") for i in range(num_blocks)
        ]
        self.init_weights()

    def _pooled_dim(self, global_pool: str) -> int:
        return 4 * self.embed_dim if global_pool == "corners" else self.embed_dim

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation (module docstring); mixers keep the init they were built with."""
        small_init_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.pos_embed is not None:
            small_init_(self.pos_embed.embed)
        for vb in self.block_stack.blocks:
            for blk in (vb.block0, vb.block1):
                for lin in (blk.upproj, blk.downproj):
                    small_init_(lin.weight)
                    nn.init.zeros_(lin.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    # --- timm model contract -------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()  # the official no_weight_decay is commented out

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^patch_embed|^pos_embed",
            blocks=[(r"^block_stack\.blocks\.(\d+)", None), (r"^norm\.", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each vision block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new ``Linear(head_hidden_size, num_classes)`` (``nn.Identity`` for 0: pooled features out)."""
        if global_pool is not None:
            if global_pool not in POOL_TYPES:
                raise ValueError(f"unknown global_pool {global_pool!r}; expected one of {POOL_TYPES}")
            self.global_pool = global_pool
            self.head_hidden_size = self._pooled_dim(global_pool)
        self.num_classes = num_classes
        if num_classes > 0:
            w = self.patch_embed.proj.weight
            self.head = nn.Linear(self.head_hidden_size, num_classes, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                trunc_normal_(self.head.weight, std=2e-5)
                nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Change the nominal input size, resampling the position embedding to the new grid."""
        self.img_size = to_2tuple(img_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        if self.pos_embed is not None:
            emb = self.pos_embed.embed
            self.pos_embed.embed = nn.Parameter(PosEmbed2d.resample(emb.detach(), self.grid_size),
                                                requires_grad=emb.requires_grad)

    # --- forward --------------------------------------------------------------------------------------

    def embed(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Image → position-embedded tokens ``(B, h·w, D)`` and the grid ``(h, w)``."""
        if not self.dynamic_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} != img_size {self.img_size} (dynamic_img_size=False)")
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = self.pos_embed(x)
        B, h, w, D = x.shape
        return x.reshape(B, h * w, D), (h, w)

    def run_block(self, blk: nn.Module, x: Tensor, hw: Tuple[int, int]) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(blk, x, hw, use_reentrant=False)
        return blk(x, hw)

    def forward_features(self, x: Tensor) -> Tensor:
        """Image ``(B, C, H, W)`` → normalised token map ``(B, h, w, D)`` (NHWC, unpooled)."""
        x, (h, w) = self.embed(x)
        for blk in self.block_stack.blocks:
            x = self.run_block(blk, x, (h, w))
        x = self.norm(x)
        return x.unflatten(1, (h, w))

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        """``(B, h, w, D)`` → ``(B, 4D)`` corners (top-left, bottom-left, top-right, bottom-right), ``(B, D)``
        avg/max, or unchanged for ``''``."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "corners":
            return torch.cat([x[:, 0, 0], x[:, -1, 0], x[:, 0, -1], x[:, -1, -1]], dim=-1)
        if pool_type == "avg":
            return x.mean(dim=(1, 2))
        if pool_type == "max":
            return x.amax(dim=(1, 2))
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``(B, h, w, D)`` → logits, or pooled ``(B, head_hidden_size)`` features with ``pre_logits``."""
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # --- intermediate features (features_only=True) ---------------------------------------------------

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Vision-block outputs as ``(B, D, h, w)`` (``'NCHW'``), ``(B, h, w, D)`` (``'NHWC'``) or ``(B, h·w, D)``
        (``'NLC'``); ``norm`` applies the final RMSNorm to each. Returns the list, or
        ``(forward_features output, list)``."""
        if output_fmt not in ("NCHW", "NHWC", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW', 'NHWC' or 'NLC', got {output_fmt!r}")
        blocks = self.block_stack.blocks
        take_indices, max_index = feature_take_indices(len(blocks), indices)
        x, (h, w) = self.embed(x)
        last = max_index if (stop_early or intermediates_only) else len(blocks) - 1
        intermediates = []
        for i, blk in enumerate(blocks[: last + 1]):
            x = self.run_block(blk, x, (h, w))
            if i in take_indices:
                y = self.norm(x) if norm else x
                if output_fmt == "NCHW":
                    y = y.transpose(1, 2).reshape(y.shape[0], -1, h, w)
                elif output_fmt == "NHWC":
                    y = y.unflatten(1, (h, w))
                intermediates.append(y)
        if intermediates_only:
            return intermediates
        return self.norm(x).unflatten(1, (h, w)), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the vision blocks after the last of ``indices`` (and the norm/head if asked)."""
        take_indices, max_index = feature_take_indices(len(self.block_stack.blocks), indices)
        self.block_stack.blocks = self.block_stack.blocks[: max_index + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


# --- official checkpoints ------------------------------------------------------------------------------


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Map an official ``pLSTMVisionModel`` state dict (J = 1 vision config) onto :class:`PLSTMVisionModel`.

    Every key outside ``…interaction_module.`` is kept (the names agree); each layer's interaction module
    goes through :func:`linvision.mixers.plstm.convert_official_state_dict` (P-mode where the layer has
    ``orientation_bias``, else D-mode).
    """
    out: Dict[str, Tensor] = {}
    layers: Dict[str, Dict[str, Tensor]] = {}
    tag = "interaction_module."
    for k, v in state_dict.items():
        if tag in k:
            prefix, rest = k.split(tag, 1)
            layers.setdefault(prefix + tag, {})[rest] = v
        else:
            out[k] = v
    for prefix, sub in layers.items():
        mode = "P" if "orientation_bias" in sub else "D"
        out.update({prefix + k: v for k, v in convert_plstm_layer(sub, mode).items()})
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: PLSTMVisionModel) -> Dict[str, Tensor]:
    """Unwrap ``{'model': ...}``, convert official layer names, resample the position embedding."""
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
    state_dict = {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if any(".interaction_module.query.weight" in k for k in state_dict):
        state_dict = convert_official_state_dict(state_dict)
    pos = state_dict.get("pos_embed.embed")
    if pos is not None and model.pos_embed is not None and pos.shape != model.pos_embed.embed.shape:
        state_dict["pos_embed.embed"] = PosEmbed2d.resample(pos, model.grid_size)
    return state_dict


# --- timm registration ---------------------------------------------------------------------------------


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "",
        "hf_hub_id": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (14, 14),
        "crop_pct": 1.0,  # the configs evaluate with test_crop_ratio 1.0
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2506.11997",
        "paper_name": "pLSTM: parallelizable Linear Source Transition Mark networks",
        "origin_url": "https://github.com/ml-jku/plstm_experiments",
        **kwargs,
    }


# No weights are published upstream: every cfg is the untrained architecture.
default_cfgs = generate_default_cfgs({"plstm_vis_t": _cfg(), "plstm_vis_s": _cfg(), "plstm_vis_b": _cfg()})


def _create_plstm_vis(variant: str, pretrained: bool, model_args: Dict[str, Any], kwargs: Dict[str, Any]):
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        PLSTMVisionModel,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(model_args, **kwargs),
    )


@register_model
def plstm_vis_t(pretrained: bool = False, **kwargs) -> PLSTMVisionModel:
    """pLSTM-Vis-T: dim 192, 3 heads, 6 P/D vision blocks, corner pooling; 6.31M params."""
    args = dict(patch_size=16, embed_dim=192, num_heads=3, num_blocks=6, drop_path_rate=0.0)
    return _create_plstm_vis("plstm_vis_t", pretrained, args, kwargs)


@register_model
def plstm_vis_s(pretrained: bool = False, **kwargs) -> PLSTMVisionModel:
    """pLSTM-Vis-S: dim 384, 6 heads, 6 P/D vision blocks, corner pooling; 23.27M params."""
    args = dict(patch_size=16, embed_dim=384, num_heads=6, num_blocks=6, drop_path_rate=0.05)
    return _create_plstm_vis("plstm_vis_s", pretrained, args, kwargs)


@register_model
def plstm_vis_b(pretrained: bool = False, **kwargs) -> PLSTMVisionModel:
    """pLSTM-Vis-B: dim 768, 12 heads, 6 P/D vision blocks, corner pooling; 89.12M params."""
    args = dict(patch_size=16, embed_dim=768, num_heads=12, num_blocks=6, drop_path_rate=0.1)
    return _create_plstm_vis("plstm_vis_b", pretrained, args, kwargs)
