"""PyTorch reference of bidirectional linear attention: the CPU path and the test oracle.

Sums run in fp32 (fp64 for fp64 inputs); the output has the input dtype. The sequence is
processed in chunks of tokens (key chunks add into one state, query chunks read it), so no
temporary larger than one chunk of Q/K/V is held: the feature map, the fp32 upcast and the
products exist one chunk at a time. See ``linear_attention`` for the equations.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .feature_maps import apply_feature_map
from .state import accumulation_dtype, apply_state, state_of

CHUNK_ELEMENTS = 1 << 18  # elements of one [B, chunk, H, D] temporary


def chunk_tokens(t: Tensor) -> int:
    """Tokens per chunk for a [B, N, H, D] tensor: about CHUNK_ELEMENTS elements, at least 64 tokens.

    A symbolic batch (``torch.export`` / ``torch.compile`` with a dynamic batch dimension) counts as one
    sample, so the chunk size, hence the traced loop, never depends on B: no guard specialises the batch.
    """
    B, _, H, D = t.shape
    per_batch = B if isinstance(B, int) else 1
    return max(64, CHUNK_ELEMENTS // max(1, per_batch * H * D))


def _rows(t: Optional[Tensor], a: int, b: int) -> Optional[Tensor]:
    return None if t is None else t[:, a:b]


def linear_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_den: Optional[Tensor],
    k_den: Optional[Tensor],
    k_weight: Optional[Tensor],
    v_weight: Optional[Tensor],
    normalize: str,
    mean: bool,
    eps: float,
    scale: float,
    feature_map: Optional[str] = None,
    feature_offset: float = 0.0,
) -> Tensor:
    """Reference forward; arguments already validated.

    q: [B, N, H, Dk], k: [B, M, H, Dk], v: [B, M, H, Dv], q_den/k_den: [B, N|M, H, Dd] or None,
    k_weight/v_weight: [B, M, H] (broadcast views allowed) or None. Returns [B, N, H, Dv].
    """
    M, N = k.shape[1], q.shape[1]
    step = chunk_tokens(v)
    state = None
    for a in range(0, M, step):
        part = state_of(
            k[:, a : a + step], v[:, a : a + step], _rows(k_den, a, a + step),
            _rows(k_weight, a, a + step), _rows(v_weight, a, a + step), feature_map, feature_offset,
        )
        state = part if state is None else state + part
    out = q.new_empty(q.shape[0], N, q.shape[2], v.shape[-1])
    for a in range(0, N, step):
        out[:, a : a + step] = apply_state(
            q[:, a : a + step], state, _rows(q_den, a, a + step), normalize, mean, eps, scale, feature_map, feature_offset
        )
    return out


def linear_attention_quadratic(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_den: Optional[Tensor],
    k_den: Optional[Tensor],
    k_weight: Optional[Tensor],
    v_weight: Optional[Tensor],
    normalize: str,
    mean: bool,
    eps: float,
    scale: float,
    feature_map: Optional[str] = None,
    feature_offset: float = 0.0,
) -> Tensor:
    """The same operator through the explicit [N, M] score matrix, O(N·M); an independent oracle for tests."""
    out_dtype = q.dtype
    acc = accumulation_dtype(out_dtype)
    phi = lambda t: apply_feature_map(t.to(acc), feature_map, feature_offset)  # noqa: E731
    q, k, v = phi(q), phi(k), v.to(acc)
    count = k.shape[1] if mean else 1
    ones = torch.ones(k.shape[:3], dtype=acc, device=k.device)
    wk = ones if k_weight is None else k_weight.to(acc).expand(k.shape[:3])
    wv = ones if v_weight is None else v_weight.to(acc).expand(k.shape[:3])
    scores = torch.einsum("bnhk,bmhk->bhnm", q, k) * wk.permute(0, 2, 1).unsqueeze(2)  # [B, H, N, M]
    vw = v * wv.unsqueeze(-1)
    num = torch.einsum("bhnm,bmhv->bnhv", scores, vw) / count
    if normalize == "none":
        return (scale * num).to(out_dtype)
    qd = q if q_den is None else phi(q_den)
    kd = k if k_den is None else phi(k_den)
    den_scores = torch.einsum("bnhd,bmhd->bhnm", qd, kd) * wk.permute(0, 2, 1).unsqueeze(2)
    qz = den_scores.sum(-1).permute(0, 2, 1).unsqueeze(-1) / count  # [B, N, H, 1]
    if normalize == "div":
        return (num / (qz + eps)).to(out_dtype)
    v_bar = vw.sum(1, keepdim=True) / count
    return (scale * num + (1.0 - scale * qz) * v_bar).to(out_dtype)
