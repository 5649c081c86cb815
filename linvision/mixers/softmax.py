"""Softmax attention through PyTorch SDPA: the baseline every benchmark compares with."""
from __future__ import annotations

from typing import Tuple

import torch.nn.functional as F
from torch import Tensor

from .base import QKVMixer


class SoftmaxAttention(QKVMixer):
    """Multi-head softmax self-attention over all tokens (prefix tokens included), scale ``D^-½``.

    Same parameters and names as ``timm.layers.Attention`` (``qkv``, ``proj``), so a timm ViT's
    weights load as they are. Quadratic in the token count.
    """

    linear_cost = False

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias, proj_bias)

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        q, k, v = self.project_qkv(x)  # unpacked, not iterated: torch.fx traces this
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, D)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).flatten(2))
