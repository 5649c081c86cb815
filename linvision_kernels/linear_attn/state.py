"""The two phases of bidirectional linear attention, as a state you can add up.

``S = Σ_j k̃_j ṽ_jᵀ``, ``z = Σ_j w_j kd_j``, ``v̄ = Σ_j ṽ_j`` are sums over key tokens, so the state of a
sequence is the sum of the states of its chunks (or of its shards on several devices). Applying it
to queries needs no other token. This lets a caller stream keys and queries through in chunks, never
holding all of Q, K and V at once: O(chunk) memory instead of O(N).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from .feature_maps import apply_feature_map


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other floating dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class LinearAttentionState:
    """Key-side sums: ``kv [B, H, Dk, Dv]``, ``k_sum [B, H, Dd]`` (or None), ``v_sum [B, H, Dv]`` (or None), ``count`` tokens."""

    kv: Tensor
    k_sum: Optional[Tensor]
    v_sum: Optional[Tensor]
    count: int

    def __add__(self, other: "LinearAttentionState") -> "LinearAttentionState":
        add = lambda a, b: None if a is None else a + b  # noqa: E731
        return LinearAttentionState(
            self.kv + other.kv, add(self.k_sum, other.k_sum), add(self.v_sum, other.v_sum), self.count + other.count
        )


def state_of(
    k: Tensor,
    v: Tensor,
    k_den: Optional[Tensor] = None,
    k_weight: Optional[Tensor] = None,
    v_weight: Optional[Tensor] = None,
    feature_map: Optional[str] = None,
    feature_offset: float = 0.0,
) -> LinearAttentionState:
    """Sums over the key tokens of ``k [B, M, H, Dk]``, ``v [B, M, H, Dv]`` (weights ``[B, M, H]``), in fp32."""
    acc = accumulation_dtype(k.dtype)
    kf = apply_feature_map(k.to(acc), feature_map, feature_offset)
    vf = v.to(acc)
    wk = None if k_weight is None else k_weight.to(acc).unsqueeze(-1)
    if wk is not None:
        kf = kf * wk
    if v_weight is not None:
        vf = vf * v_weight.to(acc).unsqueeze(-1)
    if k_den is None:
        kd = kf
    else:
        kd = apply_feature_map(k_den.to(acc), feature_map, feature_offset)
        kd = kd if wk is None else kd * wk
    kv = torch.einsum("bmhk,bmhv->bhkv", kf, vf)
    return LinearAttentionState(kv, kd.sum(1), vf.sum(1), k.shape[1])


def apply_state(
    q: Tensor,
    state: LinearAttentionState,
    q_den: Optional[Tensor] = None,
    normalize: str = "div",
    mean: bool = False,
    eps: float = 1e-6,
    scale: float = 1.0,
    feature_map: Optional[str] = None,
    feature_offset: float = 0.0,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Outputs ``[B, N, H, Dv]`` of queries ``q [B, N, H, Dk]`` against ``state`` (see ``linear_attention``)."""
    acc = state.kv.dtype
    c: Union[int, float] = state.count if mean else 1
    qf = apply_feature_map(q.to(acc), feature_map, feature_offset)
    num = torch.einsum("bnhk,bhkv->bnhv", qf, state.kv / c)
    if normalize == "none":
        out = scale * num
    else:
        qd = qf if q_den is None else apply_feature_map(q_den.to(acc), feature_map, feature_offset)
        qz = torch.einsum("bnhd,bhd->bnh", qd, state.k_sum / c).unsqueeze(-1)
        if normalize == "div":
            out = num / (qz + eps)
        else:  # "sub": o = s·qS + (1 − s·qd·z)·v̄, weights sum to one without a division (InLine)
            out = scale * num + (1.0 - scale * qz) * (state.v_sum / c).unsqueeze(1)
    return out.to(out_dtype or q.dtype)
