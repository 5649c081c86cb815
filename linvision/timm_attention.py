"""timm's softmax self-attentions, read into one layout: a plain ``timm.layers.Attention`` with the same weights.

``linvision.timm.linearize`` takes three timm attention classes:

- ``timm.layers.Attention`` (ViT, DeiT, ...; ``qk_norm=True`` gives per-head ``q_norm``/``k_norm``),
- ``timm.models.eva.EvaAttention`` (EVA, EVA02: fused ``qkv`` without bias plus ``q_bias``, a zero ``k_bias``
  buffer and ``v_bias``, or separate ``q_proj``/``k_proj``/``v_proj``; RoPE passed in each call),
- ``timm.layers.AttentionRope`` (the ``vit_*_rope_*`` models, also built by ``timm/models/eva.py``).

:func:`as_plain_attention` maps the last two onto the first (``qkv`` rows ``[q; k; v]``, bias
``[q_bias; k_bias; v_bias]``, the missing k bias as zeros, as their forward adds it), carrying the teacher's
``q_norm``/``k_norm`` modules, so that every mixer's weight inheritance reads one layout. What the plain
layout has no place for (an output norm, a gate) is left to :func:`linvision.timm.unsupported_parts`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from timm.layers import Attention, AttentionRope
from timm.models.eva import EvaAttention
from torch import Tensor, nn

ATTENTIONS = (Attention, EvaAttention, AttentionRope)


def _fused(attn: nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
    """``(qkv weight [3·A, C], qkv bias [3·A] | None)`` of an ``EvaAttention`` / ``AttentionRope``."""
    if getattr(attn, "qkv", None) is not None:
        weight = attn.qkv.weight
        if isinstance(attn, EvaAttention) and attn.q_bias is not None:
            return weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        return weight, attn.qkv.bias
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([p.weight for p in projs])
    if all(p.bias is None for p in projs):
        return weight, None
    return weight, torch.cat([p.weight.new_zeros(p.out_features) if p.bias is None else p.bias for p in projs])


@torch.no_grad()
def as_plain_attention(attn: nn.Module) -> nn.Module:
    """``attn`` itself unless it is an ``EvaAttention`` / ``AttentionRope`` (``timm.layers.Attention``, a
    linvision ``SoftmaxAttention`` already have the layout); for those a new
    ``Attention`` (same device and dtype) with their ``qkv``/``proj`` weights fused as above and their
    own ``q_norm``, ``k_norm``, ``norm``, ``attn_drop``, ``proj_drop`` modules (not copies); a gate becomes
    ``gate``. ``ValueError`` for grouped-query attention or heads whose total width is not ``dim``."""
    if not isinstance(attn, ATTENTIONS[1:]):
        return attn
    name = type(attn).__name__
    kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
    if kv_heads != attn.num_heads:
        raise ValueError(f"{name} has grouped-query attention (num_kv_heads={kv_heads}, num_heads={attn.num_heads}):"
                         " the mixers have one key/value head per query head")
    weight, bias = _fused(attn)
    dim = attn.proj.out_features
    if weight.shape != (3 * dim, dim) or attn.proj.in_features != dim:
        raise ValueError(f"{name} heads span {weight.shape[0] // 3} channels, not dim={dim} (attn_head_dim): "
                         "the mixers need num_heads · head_dim == dim")
    plain = Attention(dim, attn.num_heads, qkv_bias=bias is not None, proj_bias=attn.proj.bias is not None)
    plain = plain.to(device=weight.device, dtype=weight.dtype)
    plain.qkv.weight.copy_(weight)
    if bias is not None:
        plain.qkv.bias.copy_(bias)
    plain.proj.weight.copy_(attn.proj.weight)
    if attn.proj.bias is not None:
        plain.proj.bias.copy_(attn.proj.bias)
    for part in ("q_norm", "k_norm", "norm", "attn_drop", "proj_drop"):
        setattr(plain, part, getattr(attn, part))
    if getattr(attn, "gate", None) is not None:
        plain.gate = attn.gate
    plain.train(attn.training)
    return plain


def rotate_half(attn: nn.Module) -> bool:
    """Whether ``attn`` rotates with timm's ``rotate_half`` layout (else interleaved pairs)."""
    return bool(getattr(attn, "rotate_half", False))


__all__ = ["ATTENTIONS", "as_plain_attention", "rotate_half"]
