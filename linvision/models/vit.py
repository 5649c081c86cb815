"""A Vision Transformer with any linvision mixer, registered in timm as ``linvit_{tiny,small,base}_patch16_224``.

>>> import linvision, timm
>>> m = timm.create_model("linvit_small_patch16_224", mixer="linear")               # every layer linear
>>> m = timm.create_model("linvit_small_patch16_224", mixer=["linear"] * 3 + ["softmax"])  # 3:1 hybrid
>>> m = timm.create_model("linvit_tiny_patch16_224", mixer="lit", mixer_kwargs={"dwc_kernel_size": 3})

The model follows timm's ``VisionTransformer`` (same parameter names, so a timm ViT checkpoint loads into a
``qkv``/``proj`` mixer such as ``softmax`` or ``linear``), except that every block passes the token grid
``hw`` and ``num_prefix_tokens`` to its mixer, and that the grid always comes from the input.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Set, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .block import MixerBlock
from .layout import MixerSpec, layer_options, resolve_mixers

try:  # recent timm records reconstruction arguments changed after construction (for save_for_hf)
    from timm.models._input import update_model_args, update_model_input_size
except ImportError:  # pragma: no cover - older timm: nothing to record

    def update_model_args(model: nn.Module, **model_args: Any) -> None:
        pass

    def update_model_input_size(model: nn.Module, img_size: Any, **model_args: Any) -> None:
        pass


__all__ = ["LinVisionTransformer", "default_cfgs"]  # timm's register_model appends the entry points

POOL_TYPES = ("", "token", "avg", "max", "avgmax")


class LinVisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al., 2021) whose blocks use linvision mixers: image ``(B, C, H, W)`` → logits.

    Tokens are ``num_prefix_tokens`` prefix tokens (class token, then ``reg_tokens`` registers) followed by
    the ``h·w`` patch tokens in raster order; ``(h, w)`` is the patch grid of the current input.

    Args (beyond timm's usual ViT ones):
        mixer: one ``linvision.list_mixers()`` name for every block, or a per-block list (length ``depth``,
            or a shorter pattern whose length divides ``depth``, repeated; see
            :func:`linvision.models.layout.resolve_mixers`).
        mixer_kwargs: mechanism options. Keys naming a mixer hold that mechanism's own options
            (``{'linear': {'feature_map': 'relu'}}``), other keys go to every block's mixer
            (:func:`linvision.models.layout.layer_options`). ``qkv_bias`` is passed to mixers that accept it.
        dynamic_img_size: accept any input resolution: the absolute position embedding is resampled to
            the input's grid, which the mixers also receive. Otherwise the input must be ``img_size``.
        mlp_layer: ``"mlp"`` (timm's) or ``"glumbconv"`` (SANA's Mix-FFN on the patch grid; see
            :class:`~linvision.models.block.MixerBlock`).

    Init: timm's ViT init (``trunc_normal(0.02)`` for every ``nn.Linear``, mixers' projections included,
    zero biases; position embedding ``trunc_normal(0.02)``; class/register tokens ``normal(1e-6)``). A mixer
    that needs its own init defines ``init_weights()``, which is called afterwards.

    Unsupported: attention masks, token dropping (it would break the grid), pre-norm (CLIP style),
    attention pooling heads.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        mixer: MixerSpec = "softmax",
        mixer_kwargs: Optional[Mapping[str, Any]] = None,
        init_values: Optional[float] = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        fc_norm: Optional[bool] = None,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mlp_layer: str = "mlp",
    ):
        super().__init__()
        if global_pool not in POOL_TYPES:
            raise ValueError(f"unknown global_pool {global_pool!r}; expected one of {POOL_TYPES}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        self.mixers = tuple(resolve_mixers(mixer, depth))
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.has_class_token = class_token
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            output_fmt="NHWC",  # the grid stays visible until the position embedding is added
            strict_img_size=not dynamic_img_size,
            dynamic_img_pad=dynamic_img_pad,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        drop_path = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
        defaults = {"qkv_bias": qkv_bias}
        self.blocks = nn.Sequential(
            *[
                MixerBlock(
                    embed_dim,
                    num_heads,
                    mixer=name,
                    mixer_kwargs=layer_options(name, mixer_kwargs, defaults),
                    mlp_ratio=mlp_ratio,
                    init_values=init_values,
                    drop_path=drop_path[i],
                    mlp_layer=mlp_layer,
                )
                for i, name in enumerate(self.mixers)
            ]
        )
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        use_fc_norm = global_pool in ("avg", "max", "avgmax") if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(embed_dim)
        self.fc_norm = LayerNorm(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's ViT init (see the class docstring), then each mixer's own ``init_weights()`` if it has one."""
        trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:
            if callable(getattr(blk.attn, "init_weights", None)):
                blk.attn.init_weights()

    # --- timm model contract -------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed", "cls_token", "reg_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new ``Linear(embed_dim, num_classes)`` head (``nn.Identity`` for 0: pooled features out)."""
        if global_pool is not None:
            if global_pool not in POOL_TYPES:
                raise ValueError(f"unknown global_pool {global_pool!r}; expected one of {POOL_TYPES}")
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool='token' needs a class token")
            self.global_pool = global_pool
            # the norm placement was chosen from global_pool at construction: keep it on reconstruction
            update_model_args(self, fc_norm=not isinstance(self.fc_norm, nn.Identity))
        self.num_classes = num_classes
        if num_classes > 0:
            p = self.pos_embed
            self.head = nn.Linear(self.embed_dim, num_classes, device=p.device, dtype=p.dtype)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)

    def set_input_size(
        self, img_size: Optional[Tuple[int, int]] = None, patch_size: Optional[Tuple[int, int]] = None
    ) -> None:
        """Change the nominal input size (and patch size), resampling the position embedding to the new grid."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        new_grid = self.patch_embed.grid_size
        if new_grid != old_grid:
            pos = resample_abs_pos_embed(
                self.pos_embed,
                new_size=new_grid,
                old_size=old_grid,
                num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
            )
            self.pos_embed = nn.Parameter(pos, requires_grad=self.pos_embed.requires_grad)
        update_model_input_size(self, self.patch_embed.img_size, patch_size=patch_size)

    # --- forward --------------------------------------------------------------------------------------

    def embed(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Image ``(B, C, H, W)`` → position-embedded tokens ``(B, num_prefix_tokens + h·w, D)`` and ``(h, w)``."""
        x = self.patch_embed(x)  # (B, h, w, D)
        B, h, w, D = x.shape[0], x.shape[1], x.shape[2], x.shape[3]  # indexed, not unpacked: FX-traceable
        pos = self.pos_embed
        if self.dynamic_img_size:
            pos = resample_abs_pos_embed(
                pos,
                new_size=(h, w),
                old_size=self.patch_embed.grid_size,
                num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
            )
        x = x.reshape(B, h * w, D)
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return self.pos_drop(x), (h, w)

    def run_block(self, blk: nn.Module, x: Tensor, hw: Tuple[int, int]) -> Tensor:
        """One block, under activation checkpointing when enabled and gradients are recorded."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(blk, x, hw, self.num_prefix_tokens, use_reentrant=False)
        return blk(x, hw, self.num_prefix_tokens)

    def forward_features(self, x: Tensor) -> Tensor:
        """Image ``(B, C, H, W)`` → normalised tokens ``(B, num_prefix_tokens + h·w, D)`` (unpooled)."""
        x, hw = self.embed(x)
        for blk in self.blocks:
            x = self.run_block(blk, x, hw)
        return self.norm(x)

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        """Tokens ``(B, N, D)`` → ``(B, D)`` (``pool_type=''``: unchanged). avg/max pools skip the prefix tokens."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, 0]
        if not pool_type:
            return x
        x = x[:, self.num_prefix_tokens :]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))  # avgmax

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens ``(B, N, D)`` → logits ``(B, num_classes)``, or pooled features ``(B, D)`` with ``pre_logits``."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # --- intermediate features (features_only=True) ---------------------------------------------------

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Block outputs as ``(B, D, h, w)`` maps (``output_fmt='NCHW'``) or ``(B, h·w, D)`` tokens (``'NLC'``).

        ``indices``: the last n blocks (int), the given blocks (list, negatives from the end) or all (None).
        ``norm`` applies the final norm to each; ``return_prefix_tokens`` pairs each with its prefix tokens
        ``(B, num_prefix_tokens, D)``. Returns the list, or ``(final normalised tokens, list)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, (h, w) = self.embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self.run_block(blk, x, (h, w))
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        p = self.num_prefix_tokens
        prefix = [y[:, :p] for y in intermediates]
        intermediates = [y[:, p:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.unflatten(1, (h, w)).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens and p:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the blocks after the last of ``indices`` (and the norm/head if asked); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices


# --- timm registration ---------------------------------------------------------------------------------


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    return {
        "url": url,
        "hf_hub_id": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


# No weights are published: every cfg is the untrained architecture (url and hf_hub_id empty).
default_cfgs = generate_default_cfgs(
    {
        "linvit_tiny_patch16_224": _cfg(),
        "linvit_small_patch16_224": _cfg(),
        "linvit_base_patch16_224": _cfg(),
    }
)


def _create_linvit(variant: str, pretrained: bool = False, **kwargs) -> LinVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        LinVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,  # timm ViT checkpoints: patch/pos embed resampling
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


@register_model
def linvit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> LinVisionTransformer:
    """ViT-Ti/16 (192 dim, 12 blocks, 3 heads) with linvision mixers (``mixer=``, ``mixer_kwargs=``)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_linvit("linvit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def linvit_small_patch16_224(pretrained: bool = False, **kwargs) -> LinVisionTransformer:
    """ViT-S/16 (384 dim, 12 blocks, 6 heads) with linvision mixers (``mixer=``, ``mixer_kwargs=``)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_linvit("linvit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def linvit_base_patch16_224(pretrained: bool = False, **kwargs) -> LinVisionTransformer:
    """ViT-B/16 (768 dim, 12 blocks, 12 heads) with linvision mixers (``mixer=``, ``mixer_kwargs=``)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_linvit("linvit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))
