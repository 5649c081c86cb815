"""Softmax attention through PyTorch SDPA: the baseline every benchmark compares with."""
from __future__ import annotations

from typing import Optional, Tuple

import torch.nn.functional as F
from torch import Tensor

from .base import QKVMixer
from .rotary import Rotation


class SoftmaxAttention(QKVMixer):
    """Multi-head softmax self-attention over all tokens (prefix tokens included), scale ``D^-½``.

    Same parameters and names as ``timm.layers.Attention`` (``qkv``, ``proj``), so a timm ViT's
    weights load as they are. Quadratic in the token count. A teacher's q/k norms
    (:meth:`carry_qk_norm`) and RoPE (``rope``, image tokens only) are applied to q and k as timm's
    ``Attention``/``EvaAttention`` do, so ``linearize(model, "softmax")`` reproduces those models too.
    """

    linear_cost = False
    supports_rope = True
    supports_qk_norm = True

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias, proj_bias)

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int, rope: Optional[Rotation] = None) -> Tensor:
        q, k, v = self.project_qkv(x)  # unpacked, not iterated: torch.fx traces this
        if rope is not None:
            q, k = rope.apply(q, num_prefix_tokens), rope.apply(k, num_prefix_tokens)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, D)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).flatten(2))
