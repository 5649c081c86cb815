"""Swap the softmax attention of a pretrained timm ViT for linvision mixers, inheriting its weights.

>>> import timm
>>> from linvision.timm import linearize
>>> vit = timm.create_model("vit_small_patch16_224", pretrained=True)
>>> model = linearize(vit, "linear")                                      # in place; returns vit
>>> model = linearize(other_vit, ["linear"] * 3 + ["softmax"])            # hybrid, as linvit's mixer=
>>> model = linearize(other_vit, "lit", dwc_kernel_size=3)                # mechanism options as kwargs

Each ``block.attn`` becomes a :class:`TimmAttention`: the mixer behind timm's call signature
``attn(x, attn_mask=None, is_causal=False)``. timm's blocks never pass the token grid, so a forward-pre-hook
on ``model.patch_embed`` (a :class:`GridHook`) reads the grid of every input image and stores it on the
model's adapters; the number of prefix tokens is read from the model once. No module-level state: the
grid lives on the adapters of each model (and follows ``copy.deepcopy``, e.g. for a model EMA).

Besides ``timm.layers.Attention`` (ViT, DeiT), the EVA family's attentions are taken (``EvaAttention``:
EVA, EVA02; ``AttentionRope``: ``vit_*_rope_*``), read into the plain layout by
:func:`linvision.timm_attention.as_plain_attention`. Mixers reproduce the teacher's q/k up to the point
where the mechanism differs: a mixer class with ``supports_qk_norm`` inherits ``q_norm``/``k_norm``
(``qk_norm=True``), one with ``supports_rope`` receives the RoPE timm passes to each block (image tokens
only, as timm; see :mod:`linvision.mixers.rotary` for the linear form). The others refuse such teachers
with a message naming the mixers that can (or drop the part with ``strict=False``). Relative position
biases (BEiT, ``vit_relpos_*``), grouped-query attention, gates and output norms stay unsupported.
"""
from __future__ import annotations

import copy
import inspect
import logging
import warnings
from typing import Any, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from .kernels.validation import check_bool, check_hw, check_int, check_optional
from .mixers import TokenMixer, create_mixer, mixer_class, mixer_options, mixers_supporting
from .mixers.rotary import Rotation
from .models.layout import MixerSpec, layer_options, resolve_mixers
from .timm_attention import ATTENTIONS, as_plain_attention, rotate_half

_logger = logging.getLogger(__name__)

# Submodules of timm's Attention that a linvision mixer reproduces (q/k/v and output projections) or that
# the adapter keeps (proj_drop). attn_drop (dropout on softmax weights) has no linear-attention analogue.
_INHERITED = ("qkv", "proj", "attn_drop", "proj_drop")


class TimmAttention(nn.Module):
    """A linvision mixer called as a timm attention: ``(B, N, C)`` → ``(B, N, C)``.

    ``forward(x, attn_mask=None, is_causal=False, rope=None)`` runs ``proj_drop(mixer(x, hw,
    num_prefix_tokens))``; ``hw`` is the current token grid, set before each model forward by
    :class:`GridHook`. ``rope``: timm's rotary embedding of the call (EVA blocks pass it), handed to the
    mixer as a :class:`~linvision.mixers.rotary.Rotation` in the ``rope_half`` layout; with
    ``rope_half=None`` it is ignored (``linearize(..., strict=False)`` dropped it). Masks and causal
    attention are not supported (``ValueError``): linvision mixers are bidirectional over all tokens.
    """

    def __init__(
        self, mixer: TokenMixer, hw: Tuple[int, int], num_prefix_tokens: int, proj_drop: Optional[nn.Module] = None,
        rope_half: Optional[bool] = None,
    ):
        super().__init__()
        self.mixer = mixer
        self.proj_drop = nn.Identity() if proj_drop is None else proj_drop
        self.hw = check_hw(hw)
        self.num_prefix_tokens = check_int("num_prefix_tokens", num_prefix_tokens, min=0)
        self.rope_half = check_optional(check_bool, "rope_half", rope_half)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                rope: Optional[Tensor] = None) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("linvision mixers attend bidirectionally over all tokens: attn_mask/is_causal unsupported")
        if rope is None or self.rope_half is None:
            return self.proj_drop(self.mixer(x, self.hw, self.num_prefix_tokens))
        with self.mixer.rotation(Rotation.from_timm(rope, self.rope_half)):
            return self.proj_drop(self.mixer(x, self.hw, self.num_prefix_tokens))

    def extra_repr(self) -> str:
        rope = "" if self.rope_half is None else f", rope_half={self.rope_half}"
        return f"hw={self.hw}, num_prefix_tokens={self.num_prefix_tokens}{rope}"


class GridHook:
    """Forward-pre-hook for ``model.patch_embed``: stores the token grid of the input image on the adapters.

    The grid is ``patch_embed.dynamic_feat_size((H, W))`` (input size over patch size, rounded up with
    dynamic padding), which equals ``patch_embed.grid_size`` at the model's fixed size. It fires on every
    path through ``patch_embed`` (``forward``, ``forward_features``, ``forward_intermediates``).
    """

    def __init__(self, adapters: Sequence[TimmAttention]):
        self.adapters = list(adapters)

    def __call__(self, patch_embed: nn.Module, args: Tuple[Any, ...]) -> None:
        hw = token_grid(patch_embed, args[0])
        for adapter in self.adapters:
            adapter.hw = hw


def token_grid(patch_embed: nn.Module, image: Tensor) -> Tuple[int, int]:
    """Patch grid ``(h, w)`` that ``patch_embed`` makes of ``image (B, C, H, W)``."""
    if hasattr(patch_embed, "dynamic_feat_size"):
        h, w = patch_embed.dynamic_feat_size(tuple(image.shape[-2:]))
    else:
        h, w = patch_embed.grid_size
    return int(h), int(w)


def why_not_linearizable(attn: Optional[nn.Module]) -> str:
    """Why a block's attention cannot become a linvision mixer: one sentence for the error message."""
    name = type(attn).__name__
    if any(hasattr(attn, a) for a in ("relative_position_bias_table", "num_relative_distance", "rel_pos")):
        return (f"{name} has a relative position bias (BEiT, RelPos ViTs): relative position bias cannot be carried "
                "by a linear mixer, which never forms the query-key score matrix the bias is added to")
    return (f"{name} is not one of timm's softmax self-attentions with qkv/proj linears (timm.layers.Attention, "
            "EvaAttention, AttentionRope)")


def attention_blocks(model: nn.Module) -> List[nn.Module]:
    """The blocks of a timm ViT / EVA, each with a timm softmax attention (:data:`ATTENTIONS`) as ``.attn``;
    ``TypeError`` otherwise."""
    blocks = getattr(model, "blocks", None)
    patch_embed = getattr(model, "patch_embed", None)
    if not isinstance(blocks, nn.Module) or patch_embed is None or not hasattr(patch_embed, "grid_size"):
        raise TypeError(
            f"linearize expects a timm VisionTransformer (with .patch_embed and .blocks), got {type(model).__name__}"
        )
    blocks = list(blocks)
    bad = [
        (i, getattr(b, "attn", None)) for i, b in enumerate(blocks)
        if not isinstance(getattr(b, "attn", None), ATTENTIONS)
    ]
    if not blocks or bad:
        found = f"blocks.{bad[0][0]}.attn: {why_not_linearizable(bad[0][1])}" if bad else "no blocks"
        raise TypeError(
            "linearize expects every block.attn to be a timm softmax self-attention (Attention, EvaAttention, "
            f"AttentionRope); {len(bad)} are not, e.g. {found}"
        )
    patch_drop = getattr(model, "patch_drop", None)
    if patch_drop is not None and not isinstance(patch_drop, nn.Identity):
        raise ValueError("token dropping (patch_drop_rate > 0) breaks the token grid the mixers need")
    return blocks


def unsupported_parts(attn: nn.Module, qk_norm: bool = False) -> List[str]:
    """Parts of a timm ``Attention`` that the mixer does not reproduce: q/k norms (unless ``qk_norm``: the
    mixer carries them), output norm, gate, other head dims."""
    keep = _INHERITED + (("q_norm", "k_norm") if qk_norm else ())
    parts = [n for n, child in attn.named_children() if n not in keep and not isinstance(child, nn.Identity)]
    dim = attn.qkv.in_features
    if attn.qkv.out_features != 3 * dim or attn.proj.in_features != dim or attn.proj.out_features != dim:
        parts.append(f"qkv {tuple(attn.qkv.weight.shape)} / proj {tuple(attn.proj.weight.shape)} (head dims != dim)")
    return parts


def inherit_mixer(attn: nn.Module, name: str, strict: bool = True, rope: bool = False, **options) -> TokenMixer:
    """Mixer ``name`` shaped like timm attention ``attn`` (:data:`ATTENTIONS`, read by
    :func:`~linvision.timm_attention.as_plain_attention`) and initialised from its weights.

    - The mixer class has a ``from_softmax`` classmethod: it builds the mixer and maps the weights
      (``options`` may include its own arguments, e.g. LiT's ``inherit``).
    - Otherwise: ``create_mixer(name, dim, num_heads, qkv_bias=..., proj_bias=..., **options)`` (bias flags
      where the mixer accepts them, ``num_heads`` overridable), then every entry of ``attn.state_dict()``
      (``qkv.*``, ``proj.*``) is copied into the mixer entry of the same name and shape.

    q/k norms: a mixer class with ``supports_qk_norm`` gets copies of them (:meth:`carry_qk_norm`, keys
    ``q_norm.*``/``k_norm.*``). ``rope=True``: the model passes RoPE to this attention, which a mixer class
    without ``supports_rope`` cannot take. Whatever of ``attn`` is not reproduced (state with no matching
    entry, q/k norms, RoPE, a gate) raises a ``ValueError`` listing it and why when ``strict``, else a
    ``UserWarning``. Parameters the mixer has beyond the
    softmax attention (convolutions, feature maps, gates) keep the mixer's init and are logged (INFO).
    The mixer is on ``attn``'s device and dtype. Unknown names or options raise ``ValueError``.
    """
    cls = mixer_class(name)
    attn = as_plain_attention(attn)
    norms = [m for m in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None))
             if m is not None and not isinstance(m, nn.Identity)]
    carry_norms = bool(norms) and cls.supports_qk_norm
    lost = unsupported_parts(attn, qk_norm=carry_norms) + (["rope"] if rope and not cls.supports_rope else [])
    from_softmax = getattr(cls, "from_softmax", None)
    if callable(from_softmax):
        params = inspect.signature(from_softmax).parameters
        accepted = set(mixer_options(name)) | {p for p in params if p != "attn"}
        unknown = sorted(set(options) - accepted - {"dim"})
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for mixer {name!r}; accepted: {sorted(accepted)}")
        if lost:
            _report(name, lost, strict)
        mixer = from_softmax(attn, **options)
        _logger.info("%s: initialised by %s.from_softmax", name, cls.__name__)
        return mixer
    defaults = {"qkv_bias": attn.qkv.bias is not None, "proj_bias": attn.proj.bias is not None}
    options = {k: v for k, v in defaults.items() if k in mixer_options(name)} | options
    num_heads = options.pop("num_heads", attn.num_heads)
    w = attn.qkv.weight
    mixer = create_mixer(name, attn.qkv.in_features, num_heads, **options).to(device=w.device, dtype=w.dtype)
    if carry_norms:
        mixer.carry_qk_norm(copy.deepcopy(attn.q_norm), copy.deepcopy(attn.k_norm))
    source, target = attn.state_dict(), mixer.state_dict()
    matched = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    lost += [f"{k} {tuple(v.shape)}" for k, v in source.items() if k not in matched]
    if lost:
        _report(name, lost, strict)
    mixer.load_state_dict(matched, strict=False)
    new = [k for k in target if k not in matched]
    if new:
        _logger.info("%s: %s keep the mixer's init (no softmax counterpart)", name, new)
    return mixer


_WHY_LOST = {
    "q_norm": "q/k normalisation (qk_norm=True) normalises q and k per head before the softmax; mixer {name!r} "
              "takes q and k straight from qkv, so the norms would be dropped and the outputs change (mixers that "
              "carry them: {supports_qk_norm})",
    "rope": "the model passes a rotary position embedding to every block (EVA02, vit_*_rope_*); mixer {name!r} "
            "cannot apply it, so the tokens would lose their positions (mixers that can: {supports_rope})",
    "norm": "the attention's output norm (scale_norm=True, EVA-CLIP's scale_attn_inner) has no place in a mixer",
    "gate": "the attention's output gate (gated=True) has no place in a mixer",
}


def _report(name: str, lost: List[str], strict: bool) -> None:
    supported = {flag: ", ".join(mixers_supporting(flag)) for flag in ("supports_qk_norm", "supports_rope")}
    why = [reason.format(name=name, **supported) for part, reason in _WHY_LOST.items() if part in lost]
    msg = f"mixer {name!r} cannot inherit {lost} from the softmax attention" + "".join(f": {w}" for w in why)
    if strict:
        raise ValueError(msg + " (pass strict=False to continue with these dropped)")
    warnings.warn(msg + "; continuing with these dropped (strict=False)", stacklevel=3)


def linearize(model: nn.Module, mixer: MixerSpec, strict: bool = True, **opts) -> nn.Module:
    """Replace every ``block.attn`` of timm ViT ``model`` by a linvision mixer, in place; returns ``model``.

    Args:
        model: a timm ``VisionTransformer`` (or subclass) or ``Eva`` (EVA, EVA02, ``vit_*_rope_*``) whose
            blocks hold timm softmax attentions (:data:`ATTENTIONS`).
        mixer: a ``linvision.list_mixers()`` name, or a per-block list (length ``depth`` or a pattern whose
            length divides it), as the ``mixer=`` of the linvit models.
        strict: raise (default) or warn when part of a softmax attention cannot be inherited
            (:func:`inherit_mixer`).
        **opts: mechanism options; a key naming a mixer holds that mechanism's own options (a dict),
            as ``mixer_kwargs`` of the linvit models.

    The new ``block.attn`` is a :class:`TimmAttention` (state-dict keys ``blocks.{i}.attn.mixer.*``); all other
    modules, weights, shapes and outputs' layout are unchanged; ``linearize(model, 'softmax')`` reproduces
    the model (RoPE and q/k norms included). With RoPE (``model.rope``), the adapters hand timm's
    embedding of each call to the mixers. The grid comes from each input (via a :class:`GridHook` on ``model.patch_embed``), so a model
    with ``dynamic_img_size=True`` still runs at any resolution. Every mixer is built before any block is
    changed: on an error the model is left as it was.
    """
    blocks = attention_blocks(model)
    names = resolve_mixers(mixer, len(blocks))
    num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
    grid = tuple(model.patch_embed.grid_size or (1, 1))
    rope = isinstance(getattr(model, "rope", None), nn.Module)
    mixers = [inherit_mixer(b.attn, n, strict=strict, rope=rope, **layer_options(n, opts))
              for b, n in zip(blocks, names)]
    adapters = []
    for block, m in zip(blocks, mixers):
        half = rotate_half(block.attn) if rope and m.supports_rope else None
        adapter = TimmAttention(m, grid, num_prefix_tokens, proj_drop=block.attn.proj_drop, rope_half=half)
        adapter.train(block.attn.training)
        block.attn = adapter
        adapters.append(adapter)
    model.patch_embed.register_forward_pre_hook(GridHook(adapters))
    return model


__all__ = ["GridHook", "TimmAttention", "attention_blocks", "inherit_mixer", "linearize", "token_grid"]
