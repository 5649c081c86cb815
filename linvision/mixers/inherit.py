"""Reading a softmax attention's projections, so linear mixers can inherit its weights.

Used by LiT's ``from_softmax``, LINA and LinFusion, ``linvision.timm.linearize`` and the diffusers adapters.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict

import torch
from torch import Tensor, nn

from .base import QKVMixer


def effective_linear(module: nn.Module) -> SimpleNamespace:
    """``SimpleNamespace(weight, bias, in_features, out_features)`` of a linear as it runs.

    An ``nn.Linear`` gives its own tensors. A peft LoRA layer (``pipe.load_lora_weights``, ``add_adapter``)
    gives its base weight plus the delta of every active, unmerged adapter (merged ones are already in
    the base), so a mixer inheriting from a LoRA'd attention starts from the attention the pipeline runs.
    ``ValueError`` for anything else.
    """
    base = getattr(module, "base_layer", None)
    if isinstance(module, nn.Linear) and base is None:
        return SimpleNamespace(weight=module.weight, bias=module.bias, in_features=module.in_features,
                               out_features=module.out_features)
    if not isinstance(base, nn.Linear) or not hasattr(module, "get_delta_weight"):
        raise ValueError(f"{type(module).__name__} is neither an nn.Linear nor a peft LoRA layer around one")
    weight = base.weight
    if not getattr(module, "merged", False) and not getattr(module, "disable_adapters", False):
        for name in module.active_adapters:
            if name in getattr(module, "lora_A", {}):
                weight = weight + module.get_delta_weight(name)
    return SimpleNamespace(weight=weight, bias=base.bias, in_features=base.in_features, out_features=base.out_features)


def _is_linear(module: object) -> bool:
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def softmax_attention_weights(attn: nn.Module, allow_qk_norm: bool = False) -> SimpleNamespace:
    """The projections of a softmax self-attention in the fused layout.

    Returns ``SimpleNamespace(dim, num_heads, qkv_weight (3C, C), qkv_bias (3C,) | None,
    proj_weight (C, C), proj_bias (C,) | None)``; tensors are the module's own (not copies).

    Accepts ``qkv``/``proj`` modules (linvision ``SoftmaxAttention``, timm ``Attention``) and diffusers
    ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out[0]``; a missing bias among q/k/v is read as zeros;
    peft LoRA layers on them count with their active deltas, :func:`effective_linear`).
    Raises ``ValueError`` for anything a plain multi-head softmax self-attention would not have: cross or
    joint attention, q/k norms, group or spatial norms, residual/rescaled outputs, ``inner_dim != dim``.
    ``allow_qk_norm=True`` accepts a diffusers ``norm_q``/``norm_k`` (for a mixer that has them: SANA-1.5's).
    """
    if isinstance(getattr(attn, "qkv", None), nn.Linear) and isinstance(getattr(attn, "proj", None), nn.Linear):
        for name in ("q_norm", "k_norm", "norm"):
            sub = getattr(attn, name, None)
            if sub is not None and not isinstance(sub, nn.Identity):
                raise ValueError(f"the softmax attention has a non-identity {name!r}, which a linear mixer lacks")
        qkv, proj = attn.qkv, attn.proj
        dim = qkv.in_features
        if qkv.out_features != 3 * dim or proj.in_features != dim or proj.out_features != dim:
            raise ValueError(f"expected qkv Linear({dim}, {3 * dim}) and proj Linear({dim}, {dim})")
        num_heads = getattr(attn, "num_heads", None)
        if not isinstance(num_heads, int):
            raise ValueError("the softmax attention has no integer num_heads attribute")
        return SimpleNamespace(
            dim=dim,
            num_heads=num_heads,
            qkv_weight=qkv.weight,
            qkv_bias=qkv.bias,
            proj_weight=proj.weight,
            proj_bias=proj.bias,
        )
    if all(_is_linear(getattr(attn, n, None)) for n in ("to_q", "to_k", "to_v")):
        if getattr(attn, "is_cross_attention", False) or getattr(attn, "only_cross_attention", False):
            raise ValueError("cross-attention cannot become a self-attention mixer")
        extras = ("norm_q", "norm_k", "group_norm", "spatial_norm", "norm_cross", "add_q_proj", "add_k_proj", "add_v_proj")
        for name in extras[2 * allow_qk_norm:]:
            if getattr(attn, name, None) is not None:
                raise ValueError(f"the diffusers Attention has {name!r}, which a linear mixer lacks")
        if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0:
            raise ValueError("the diffusers Attention has a residual connection or an output rescale")
        to_out = getattr(attn, "to_out", None)
        if to_out is None or len(to_out) == 0 or not _is_linear(to_out[0]):
            raise ValueError("the diffusers Attention has no to_out[0] Linear")
        q, k, v, o = (effective_linear(t) for t in (attn.to_q, attn.to_k, attn.to_v, to_out[0]))
        dim = q.in_features
        if any(t.in_features != dim or t.out_features != dim for t in (q, k, v, o)):
            raise ValueError(f"to_q/to_k/to_v/to_out[0] must all be Linear({dim}, {dim}) (inner_dim == query_dim)")
        num_heads = getattr(attn, "heads", getattr(attn, "num_heads", None))  # diffusers' name, or a mixer's (sana)
        if not isinstance(num_heads, int):
            raise ValueError("the diffusers Attention has no integer heads attribute")
        biases = [t.bias for t in (q, k, v)]
        if all(b is None for b in biases):
            qkv_bias = None
        else:
            qkv_bias = torch.cat([q.weight.new_zeros(dim) if b is None else b for b in biases])
        return SimpleNamespace(
            dim=dim,
            num_heads=num_heads,
            qkv_weight=torch.cat([q.weight, k.weight, v.weight]),
            qkv_bias=qkv_bias,
            proj_weight=o.weight,
            proj_bias=o.bias,
        )
    raise ValueError(
        f"{type(attn).__name__} is not a softmax attention with qkv/proj or to_q/to_k/to_v/to_out Linears"
    )


@torch.no_grad()
def copy_qkv_proj(mixer: QKVMixer, src: SimpleNamespace, inherit: str = "qkv+proj") -> None:
    """Copy ``src`` (from :func:`softmax_attention_weights`) into ``mixer.qkv``/``mixer.proj`` per ``inherit``."""
    if inherit == "qkv+proj":
        mixer.qkv.weight.copy_(src.qkv_weight)
        if src.qkv_bias is not None:
            mixer.qkv.bias.copy_(src.qkv_bias)
    if inherit in ("qkv+proj", "proj"):
        mixer.proj.weight.copy_(src.proj_weight)
        if src.proj_bias is not None:
            mixer.proj.bias.copy_(src.proj_bias)


def fuse_q_kv_state_dict(module: nn.Module, state_dict: Dict[str, Tensor], prefix: str, *args) -> None:
    """Load-state-dict pre-hook: ``{prefix}q.*`` + ``{prefix}kv.*`` → ``{prefix}qkv.*`` (rows ``[q; k; v]``).

    The split layout is the LiT-style file's and LINA's ``vision_transformer_linear9.py::Attention``
    (``q = Linear(C, C)``, ``kv = Linear(C, 2C)`` whose rows are ``[k; v]``); concatenating the rows gives
    exactly the fused ``qkv`` of this project. Does nothing when ``{prefix}qkv.weight`` is present.
    """
    if prefix + "qkv.weight" in state_dict or not (prefix + "q.weight" in state_dict and prefix + "kv.weight" in state_dict):
        return
    for suffix in ("weight", "bias"):
        q, kv = state_dict.pop(prefix + "q." + suffix, None), state_dict.pop(prefix + "kv." + suffix, None)
        if q is not None and kv is not None:
            state_dict[prefix + "qkv." + suffix] = torch.cat([q, kv])
        elif q is not None or kv is not None:
            raise ValueError(f"{prefix}q.{suffix} and {prefix}kv.{suffix} must be both present or both absent")


__all__ = ["softmax_attention_weights", "copy_qkv_proj", "effective_linear", "fuse_q_kv_state_dict"]
