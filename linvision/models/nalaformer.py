"""NaLaFormer: the hierarchical backbone of the norm-aware linear attention paper, as timm models.

Paper: Meng et al., "Norm × Direction: Restoring the Missing Query Norm in Vision Linear Attention"
(arXiv 2506.21137, ICML 2026). Official code followed, read at commit
1f1c10aeab8cd9a665bf74cbc589b4737d23d5ca: ``ZacharyMeng/NaLaFormer: NaLaformer/NALA.py`` —
``NALAFORMER`` → :class:`NaLaFormer`, ``BasicLayer``, ``Block``, ``FeedForwardNetwork``, ``PatchEmbed``,
``PatchMerging``, ``LayerNorm2d``, ``RoPE`` (same names, in :mod:`linvision.models.nalaformer_blocks`),
``NALAFORMER_{XT,T,S,B,L}`` → ``nalaformer_{xt,t,s,b,l}``.

>>> import linvision, timm
>>> m = timm.create_model("nalaformer_s")                              # official hybrid: nala, nala, softmax, softmax
>>> m = timm.create_model("nalaformer_s", mixer="nala")                # pure linear (does not match the paper's numbers)
>>> m = timm.create_model("nalaformer_t", mixer=["nala", "nala", ["nala"] * 5 + ["nala_softmax"], "nala_softmax"])
>>> m = timm.create_model("nalaformer_t", features_only=True)          # 4 NCHW maps at strides 4, 8, 16, 32

Architecture (``(B, 3, H, W)`` → logits; every stage works on NCHW maps)::

    patch_embed   4 × (Conv3×3 + BN), GELU between; strides 2, 1, 1, 2 → (B, C1, H/4, W/4)
    layers[i]     depth_i × Block, then (i < 3) PatchMerging = Conv3×3 stride 2 + BN → C_{i+1}
    Block         x += cpe1(x)                            DWConv3×3
                  x += drop_path(γ1 · attn(norm1(x)))     LayerNorm2d (eps 1e-6); attn sees (B, h·w, C) tokens
                  x += cpe2(x)
                  x += drop_path(γ2 · ffn(norm2(x)))      fc1 → GELU → (DWConv3×3 + residual) → fc2
    head          proj Linear(C4 → 1024) per pixel → BatchNorm2d → Swish → global pool → 1×1 conv ``head``

``forward_features`` returns the stage-4 map ``(B, C4, H/32, W/32)`` (``num_features = C4``); ``forward_head``
runs proj → norm → swish → pool (``pre_logits`` stops here: ``head_hidden_size = projection`` = 1024) → head.

Attention per stage: the official ``NALAFORMER`` defaults ``flagss = [l…, l…, v…, v…]`` and no variant
overrides it, so stages 1–2 use NaLa linear attention (``"nala"``) and stages 3–4 softmax attention
(``"nala_softmax"``). ``mixer=`` replaces that: one name (every block), a per-stage list (4 entries, each a
name or a per-block list/pattern for that stage), or a per-block list of ``sum(depths)`` names. The official
flags ``'l'``/``'v'`` are accepted as names. Any registered linvision mixer works (it gets the stage's
tokens and ``hw``, and no prefix tokens, so mixers with a ``prefix_mode`` default to ``"bypass"``);
``mixer_kwargs`` as for the linvit models (:func:`linvision.models.layout.layer_options`).

Parameter names are the official ones, so a ``NALAFORMER`` state dict loads with ``strict=True`` (the
per-stage ``RoPE.angle`` buffer is kept for that; the mixers compute the same angles themselves).
Initialisation follows the official ``_init_weights`` (every ``Conv2d`` ``trunc_normal(0.02)`` with zero
bias, ``LayerNorm`` 1/0, ``Linear`` PyTorch's default) with the official module creation order, so under the
same seed the weights equal the official model's.

Parameter counts at 1000 classes (counted from the modules; the official file gives the same numbers):
XT 6.14M, T 15.91M, S 25.65M, B 52.00M, L 95.43M. The README claims XT 8M / 1.0 GFLOPs, which the released
``NALAFORMER_XT`` config does not reproduce (6.14M, 0.64 GMACs); it is built here as released.

Deviations from the official code:

- The attention modules are linvision mixers (``linvision.mixers.nala``), which take tokens and ``hw``;
  their deviations (all with equal fp32 outputs) are listed there.
- ``MemoryEfficientSwish`` (a custom autograd function) is ``nn.SiLU`` (same values and gradient).
- timm conventions added: ``global_pool`` (``'avg'`` as official, ``'max'``, ``'avgmax'``, ``''`` = no
  pooling), ``drop_rate`` (dropout before ``head``), ``reset_classifier``, ``forward_intermediates``
  (``features_only``), ``set_grad_checkpointing``. ``no_weight_decay`` is empty (the official returns
  a name that does not exist, so nothing is exempt beyond timm's 1-D rule).
- Any input size works (stride-2 convolutions round up); at sizes divisible by 32 the stage maps are
  exactly H/4 … H/32.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from .layout import resolve_mixers
from .nalaformer_blocks import BasicLayer, PatchEmbed

__all__ = ["NaLaFormer", "resolve_stage_mixers", "default_cfgs"]  # register_model appends the entry points

FLAG_NAMES = {"l": "nala", "v": "nala_softmax"}  # the official per-block flags
POOL_TYPES = ("", "avg", "max", "avgmax")
StageMixerSpec = Union[None, str, Sequence[Union[str, Sequence[str]]]]


def _names(entry: Any) -> Any:
    """A name or comma string → list of names with the official flags mapped; a list → mapped list."""
    if isinstance(entry, str):
        return [FLAG_NAMES.get(s.strip(), s.strip()) for s in entry.split(",")]
    if isinstance(entry, Sequence):
        return [FLAG_NAMES.get(n, n) if isinstance(n, str) else n for n in entry]
    return entry  # resolve_mixers reports it


def resolve_stage_mixers(mixer: StageMixerSpec, depths: Sequence[int]) -> List[List[str]]:
    """The mixer name of every block, per stage.

    ``mixer`` is ``None`` (the official layout: ``nala`` in stages 1–2, ``nala_softmax`` after), one name
    (every block; a comma string is read as a list), a per-stage list of ``len(depths)`` entries (each a
    name, or a list/pattern for that stage as :func:`~linvision.models.layout.resolve_mixers` reads it), or
    a flat per-block list of ``sum(depths)`` names. ``'l'`` and ``'v'`` stand for ``nala``/``nala_softmax``.
    ``ValueError`` for unknown names and lists that fit neither form.
    """
    depths = [int(d) for d in depths]
    if mixer is None:
        return [[FLAG_NAMES["l" if i < 2 else "v"]] * d for i, d in enumerate(depths)]
    if isinstance(mixer, str):
        names = _names(mixer)
        if len(names) == 1:
            return [resolve_mixers(names, d) for d in depths]
        mixer = names
    if not isinstance(mixer, Sequence) or not len(mixer):
        raise ValueError(f"mixer must be a name, a per-stage list or a per-block list, got {mixer!r}")
    nested = any(not isinstance(m, str) for m in mixer)
    if len(mixer) == len(depths) and (nested or len(depths) != sum(depths)):
        stages = []
        for i, (entry, d) in enumerate(zip(mixer, depths)):
            try:
                stages.append(resolve_mixers(_names(entry), d))
            except ValueError as err:
                raise ValueError(f"mixer for stage {i} (depth {d}): {err}") from None
        return stages
    if not nested and len(mixer) == sum(depths):
        names = resolve_mixers(_names(mixer), len(mixer))
        out, start = [], 0
        for d in depths:
            out.append(names[start : start + d])
            start += d
        return out
    raise ValueError(
        f"a mixer list must have one entry per stage ({len(depths)}) or one name per block ({sum(depths)}), "
        f"got {len(mixer)} entries: {mixer!r}"
    )



class NaLaFormer(nn.Module):
    """The NaLaFormer backbone (``NALA.py::NALAFORMER``) with timm's model interface.

    Args (official names first):
        in_chans, num_classes, embed_dims, depths, num_heads, mlp_ratios, drop_path_rate (linearly increasing
            over all blocks), projection (width of the head's per-pixel projection), layerscales,
            layer_init_values: as ``NALAFORMER``.
        mixer: the attention of every block (see :func:`resolve_stage_mixers`); ``None`` is the official
            hybrid. mixer_kwargs: mixer options (per-mechanism dicts or shared keys).
        global_pool: ``'avg'`` (official), ``'max'``, ``'avgmax'`` or ``''`` (no pooling: ``forward_head``
            returns maps). drop_rate: dropout on the pooled features before ``head``.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        mlp_ratios: Sequence[float] = (3, 3, 3, 3),
        drop_path_rate: float = 0.1,
        projection: int = 1024,
        layerscales: Sequence[bool] = (False, False, False, False),
        layer_init_values: Sequence[float] = (1e-6, 1e-6, 1e-6, 1e-6),
        mixer: StageMixerSpec = None,
        mixer_kwargs: Optional[Mapping[str, Any]] = None,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        n = len(depths)
        for name, seq in dict(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios,
                              layerscales=layerscales, layer_init_values=layer_init_values).items():
            if len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries; depths has {n} stages")
        if global_pool not in POOL_TYPES:
            raise ValueError(f"unknown global_pool {global_pool!r}; expected one of {POOL_TYPES}")
        stage_mixers = resolve_stage_mixers(mixer, depths)
        self.mixers = tuple(tuple(s) for s in stage_mixers)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_layers = n
        self.embed_dim = embed_dims[0]
        self.num_features = embed_dims[-1]
        self.head_hidden_size = self.projection = projection
        self.mlp_ratios = tuple(mlp_ratios)
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(in_chans=in_chans, embed_dim=embed_dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(n):
            start = sum(depths[:i])
            self.layers.append(
                BasicLayer(
                    stage_mixers[i],
                    embed_dim=embed_dims[i],
                    out_dim=embed_dims[i + 1] if i < n - 1 else None,
                    depth=depths[i],
                    num_heads=num_heads[i],
                    ffn_dim=int(mlp_ratios[i] * embed_dims[i]),
                    drop_path=dpr[start : start + depths[i]],
                    downsample=i < n - 1,
                    layerscale=layerscales[i],
                    layer_init_value=layer_init_values[i],
                    mixer_kwargs=mixer_kwargs,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"layers.{i}"))

        self.proj = nn.Linear(self.num_features, projection)
        self.norm = nn.BatchNorm2d(projection)
        self.swish = nn.SiLU()  # official MemoryEfficientSwish: the same function
        self.avgpool = SelectAdaptivePool2d(pool_type=global_pool, flatten=False)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Conv2d(projection, num_classes, 1) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The official ``_init_weights``: ``Conv2d`` trunc_normal(0.02) + zero bias; ``LayerNorm`` 1/0."""
        if isinstance(m, nn.Conv2d):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.constant_(m.weight, 1.0)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    # --- timm model contract -------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99998,)),  # closes its stage
                (r"^proj\.|^norm\.", (99999,)),
            ],
        )  # fmt: skip

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable
        for layer in self.layers:
            layer.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new 1×1 conv ``head`` (``nn.Identity`` for 0: pooled ``head_hidden_size`` features out)."""
        if global_pool is not None:
            if global_pool not in POOL_TYPES:
                raise ValueError(f"unknown global_pool {global_pool!r}; expected one of {POOL_TYPES}")
            self.global_pool = global_pool
            self.avgpool = SelectAdaptivePool2d(pool_type=global_pool, flatten=False)
        self.num_classes = num_classes
        if num_classes > 0:
            w = self.proj.weight
            self.head = nn.Conv2d(self.projection, num_classes, 1, device=w.device, dtype=w.dtype)
            self._init_weights(self.head)
        else:
            self.head = nn.Identity()

    # --- forward --------------------------------------------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        """Image ``(B, C, H, W)`` → stage-4 map ``(B, num_features, H/32, W/32)`` (unpooled)."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Stage-4 map → logits ``(B, num_classes)``; ``pre_logits``: pooled ``(B, head_hidden_size)``.

        ``proj`` (per pixel) → ``norm`` (BN) → Swish → pool → ``head`` (1×1 conv). Without pooling
        (``global_pool=''``) the outputs stay maps ``(B, ·, h, w)``.
        """
        x = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.avgpool(self.swish(self.norm(x)))
        x = self.head_drop(x)
        if pre_logits:
            return x.flatten(1) if self.global_pool else x
        x = self.head(x)
        return x.flatten(1) if self.global_pool else x

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
        """Stage outputs (after the stage's blocks, before its PatchMerging) as NCHW maps.

        ``indices``: the last n stages (int), the given stages (list) or all (None). ``norm`` is accepted for
        timm's interface; the model has no final norm on the stage maps, so it changes nothing. Returns the
        list, or ``(forward_features output, list)``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last = max_index if (stop_early or intermediates_only) else len(self.layers) - 1
        intermediates = []
        x = self.patch_embed(x)
        for i, layer in enumerate(self.layers[: last + 1]):
            x = layer.forward_blocks(x)
            if i in take_indices:
                intermediates.append(x)
            if layer.downsample is not None and i < last:
                x = layer.downsample(x)
        if intermediates_only:
            return intermediates
        if last == len(self.layers) - 1 and self.layers[-1].downsample is not None:
            x = self.layers[-1].downsample(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the stages after the last of ``indices`` (and that stage's PatchMerging); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        self.layers[-1].downsample = None
        self.feature_info = self.feature_info[: max_index + 1]
        self.num_features = self.layers[-1].embed_dim
        if prune_head:
            self.proj = nn.Identity()
            self.norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices


# --- timm registration ---------------------------------------------------------------------------------


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: NaLaFormer) -> Dict[str, Tensor]:
    """Official ``NALAFORMER`` checkpoints (``{'model': ...}`` or a bare state dict) load as they are."""
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    elif "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    return {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "",
        "hf_hub_id": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2506.21137",
        "paper_name": "Norm x Direction: Restoring the Missing Query Norm in Vision Linear Attention",
        "origin_url": "https://github.com/ZacharyMeng/NaLaFormer",
        **kwargs,
    }


# No weights are published ("coming soon" upstream): every cfg is the untrained architecture.
default_cfgs = generate_default_cfgs(
    {
        "nalaformer_xt": _cfg(),
        "nalaformer_t": _cfg(),
        "nalaformer_s": _cfg(),
        "nalaformer_b": _cfg(),
        "nalaformer_l": _cfg(),
    }
)


def _create_nalaformer(variant: str, pretrained: bool = False, **kwargs) -> NaLaFormer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        NaLaFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _variant(variant: str, pretrained: bool, model_args: Dict[str, Any], kwargs: Dict[str, Any]) -> NaLaFormer:
    return _create_nalaformer(variant, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nalaformer_xt(pretrained: bool = False, **kwargs) -> NaLaFormer:
    """NaLaFormer-XT (official NALAFORMER_XT): dims 32-64-128-384, depths 2-2-2-2; 6.14M params (README: 8M)."""
    args = dict(embed_dims=(32, 64, 128, 384), depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 12), mlp_ratios=(3.5,) * 4,
                drop_path_rate=0.1, projection=1024, layerscales=(True,) * 4, layer_init_values=(1, 1, 1, 1))
    return _variant("nalaformer_xt", pretrained, args, kwargs)


@register_model
def nalaformer_t(pretrained: bool = False, **kwargs) -> NaLaFormer:
    """NaLaFormer-T (official NALAFORMER_T): dims 64-128-256-512, depths 2-2-6-2; 15.91M params."""
    args = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8), mlp_ratios=(4,) * 4,
                drop_path_rate=0.1, projection=1024, layerscales=(True,) * 4, layer_init_values=(1, 1, 1, 1))
    return _variant("nalaformer_t", pretrained, args, kwargs)


@register_model
def nalaformer_s(pretrained: bool = False, **kwargs) -> NaLaFormer:
    """NaLaFormer-S (official NALAFORMER_S): dims 64-128-320-512, depths 3-5-9-3; 25.65M params."""
    args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8), mlp_ratios=(3.5,) * 4,
                drop_path_rate=0.15, projection=1024, layerscales=(True,) * 4, layer_init_values=(1, 1, 1, 1))
    return _variant("nalaformer_s", pretrained, args, kwargs)


@register_model
def nalaformer_b(pretrained: bool = False, **kwargs) -> NaLaFormer:
    """NaLaFormer-B (official NALAFORMER_B): dims 96-192-384-512, depths 4-6-12-6; 52.00M params."""
    args = dict(embed_dims=(96, 192, 384, 512), depths=(4, 6, 12, 6), num_heads=(1, 2, 6, 8), mlp_ratios=(4,) * 4,
                drop_path_rate=0.4, projection=1024, layerscales=(True,) * 4, layer_init_values=(1, 1, 1e-6, 1e-6))
    return _variant("nalaformer_b", pretrained, args, kwargs)


@register_model
def nalaformer_l(pretrained: bool = False, **kwargs) -> NaLaFormer:
    """NaLaFormer-L (official NALAFORMER_L): dims 96-192-448-640, depths 4-7-19-8; 95.43M params."""
    args = dict(embed_dims=(96, 192, 448, 640), depths=(4, 7, 19, 8), num_heads=(1, 2, 7, 10), mlp_ratios=(3.5,) * 4,
                drop_path_rate=0.55, projection=1024, layerscales=(True,) * 4, layer_init_values=(1e-6,) * 4)
    return _variant("nalaformer_l", pretrained, args, kwargs)
