"""Step-by-step recurrence: the oracle of :func:`linvision.kernels.gated_scan` (one token at a time).

Layout ``[B, N, H, D]``; the state ``S [B, H, Dk, Dv]`` is held in fp32 (fp64 for fp64 inputs). One step,
token ``t`` along the scan (``α_t = exp(g_t)``, a scalar per head or one value per key channel)::

    S ← diag(α_t) S                                   decay
    u_t = β_t (v_t − Sᵀ k_t)   (delta)   or   v_t     new value
    S ← S + k_t u_tᵀ                                  write
    o_t = scale · Sᵀ q_t                              read (inclusive)

``exclusive=True`` reads the decayed state before the write (``o_t = scale·(diag(α_t) S_{t−1})ᵀ q_t``): without
the delta rule that is the inclusive read minus the diagonal term ``scale (q_t·k_t) v_t``.

``initial_state [B, H, Dk, Dv]`` (or zeros) is the state before token 0; ``output_final_state=True`` also returns
the state after the last token, in the compute dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor


def gated_scan_naive(
    q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor], scale: float,
    exclusive: bool = False, initial_state: Optional[Tensor] = None, output_final_state: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Forward-direction scan over ``N``; ``g [B, N, H, Dk]`` (log decay, broadcast already) or ``None``,
    ``beta [B, N, H]`` or ``None`` (no delta rule). Returns ``[B, N, H, Dv]`` in the compute dtype (and the
    final state ``[B, H, Dk, Dv]`` with ``output_final_state``)."""
    B, N, H, K = q.shape
    V = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    out = []
    for t in range(N):
        if g is not None:
            S = S * g[:, t].to(dt).exp()[..., None]
        kt, vt, qt = k[:, t], v[:, t], q[:, t]
        if beta is not None:
            u = beta[:, t].to(dt)[..., None] * (vt - torch.einsum("bhkv,bhk->bhv", S, kt))
        else:
            u = vt
        read = S if exclusive else S + kt[..., None] * u[..., None, :]
        out.append(scale * torch.einsum("bhkv,bhk->bhv", read, qt))
        S = S + kt[..., None] * u[..., None, :]
    o = torch.stack(out, 1)
    return (o, S) if output_final_state else o


__all__ = ["gated_scan_naive"]
