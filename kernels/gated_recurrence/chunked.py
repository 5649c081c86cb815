"""Chunked form of the gated / delta-rule scan: the PyTorch reference and CPU path of ``gated_scan``.

Tokens are cut into chunks of ``C``; inside a chunk everything is a ``C × C`` product, across chunks an fp32
state ``S [B, H, Dk, Dv]`` is passed (the Lightning-Attention-2 / fla chunk scheme). With ``b_t`` the
cumulative log decay inside the chunk (per key channel) and ``Γ_t = diag(exp b_t)``:

- non-delta: ``u_t = v_t``;
- delta rule, WY / UT representation (as fla's chunk kernels): the new values solve the unit lower-triangular
  system ``(I + A) U = diag(β) V − diag(β) (K ⊙ e^b) S_0`` with ``A_ts = β_t Σ_c k_tc k_sc e^{b_tc − b_sc}``
  (``s < t``), so ``U = U₀ − W S_0`` with ``U₀ = T β V``, ``W = T β (K ⊙ e^b)``, ``T = (I + A)^{-1}``;
- outputs ``o_t = scale·[(q_t ⊙ e^{b_t})ᵀ S_0 + Σ_{s ≤ t} (Σ_c q_tc k_sc e^{b_tc − b_sc}) u_s]`` (``s < t`` when
  exclusive), next state ``S_C = Γ_C S_0 + ΔS − M S_0`` with ``ΔS = Σ_s (k_s ⊙ e^{b_C − b_s}) u₀_sᵀ`` and
  ``M = Σ_s (k_s ⊙ e^{b_C − b_s}) w_sᵀ``.

Chunks are processed in groups whose temporaries (the pairwise-decay tensor and the q, k, v, u tiles) stay under
``GROUP_ELEMENTS`` (about half a core's L2 in fp32, so the cost per token does not grow with N), each group end to
end (intra-chunk products, its part of the state recursion, its outputs) with the state carried to the next, so
no temporary is sized by the whole sequence; the recursion itself is two or three small ops per chunk. Pairwise decays
are masked before ``exp`` (no overflow for ``g ≤ 0``). Gradients come from autograd through these tensors.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

GROUP_ELEMENTS = 1 << 18  # cap on one group's [B, H, chunks, C, C·(1 or Dk) + 2·Dk + Dv] temporaries (L2-sized)


def _chunks(t: Tensor, C: int) -> Tensor:
    """``[B, N, H, *]`` (N a multiple of C) → ``[B, H, N/C, C, *]``."""
    B, N, H = t.shape[:3]
    return t.reshape(B, N // C, C, H, *t.shape[3:]).permute(0, 3, 1, 2, *range(4, t.dim() + 1))


def _pairwise(x: Tensor, y: Tensor, b: Tensor, lower: Tensor) -> Tensor:
    """``P_ts = Σ_c x_tc y_sc e^{b_tc − b_sc}`` for ``s ≤ t`` (0 above), ``[B, H, n, C, C]``; ``b [.., C, 1 or Dk]``."""
    diff = (b[..., :, None, :] - b[..., None, :, :]).masked_fill(~lower[..., None], float("-inf"))
    if b.shape[-1] == 1:
        return (x @ y.transpose(-1, -2)) * diff[..., 0].exp()
    return (x[..., :, None, :] * y[..., None, :, :] * diff.exp()).sum(-1)


def gated_scan_chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor], scale: float,
    exclusive: bool = False, chunk_size: int = 64, initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Forward-direction scan, same contract as :func:`.naive.gated_scan_naive` (``initial_state``,
    ``output_final_state`` included); ``g [B, N, H, 1 or Dk]``. Padded tail tokens have ``k = 0, g = 0``, so they
    leave the final state as it is."""
    B, N, H, K = q.shape
    V = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = chunk_size
    pad = (-N) % C
    q, k, v = (F.pad(t.to(dt), (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    g = q.new_zeros(B, N + pad, H, 1) if g is None else F.pad(g.to(dt), (0, 0, 0, 0, 0, pad))
    qc, kc, vc = _chunks(q, C), _chunks(k, C), _chunks(v, C)  # [B, H, n, C, D]
    gc = _chunks(g, C)  # [B, H, n, C, 1 or K]; its cumulative sum is taken per group
    bc = None if beta is None else _chunks(F.pad(beta.to(dt), (0, 0, 0, pad))[..., None], C)  # [B, H, n, C, 1]
    n = qc.shape[2]
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = lower.tril(-1)
    eye = torch.eye(C, dtype=dt, device=q.device)
    per_chunk = B * H * C * (C * gc.shape[-1] + 2 * K + V)
    group = max(1, GROUP_ELEMENTS // max(1, per_chunk))  # B = 0: one group
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    outs: List[Tensor] = []
    for a in range(0, n, group):  # each group end to end, the state carried: temporaries stay group-sized
        sl = slice(a, a + group)
        qg, kg, vg, bg = qc[:, :, sl], kc[:, :, sl], vc[:, :, sl], gc[:, :, sl].cumsum(3)
        qk = _pairwise(qg, kg, bg, lower)
        if exclusive:
            qk = qk.masked_fill(~strict, 0.0)
        u0, w = vg, None
        if bc is not None:
            betag = bc[:, :, sl]
            A = (betag * _pairwise(kg, kg, bg, lower)).masked_fill(~strict, 0.0) + eye
            rhs = torch.cat([betag * vg, betag * kg * bg.exp()], -1)
            sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
            u0, w = sol[..., :V], sol[..., V:]
        eb = bg.exp()
        k_tail = (kg * (bg[..., -1:, :] - bg).exp()).transpose(-1, -2)  # [B, H, g, K, C]: (k_s ⊙ e^{b_C − b_s})ᵀ
        dS = k_tail @ u0  # [B, H, g, K, V]
        M = None if w is None else k_tail @ w  # [B, H, g, K, K]
        last = eb[:, :, :, -1][..., None]  # [B, H, g, 1 or K, 1]
        starts = []
        for i in range(qg.shape[2]):
            starts.append(S)
            S = last[:, :, i] * S + dS[:, :, i] if M is None else last[:, :, i] * S + dS[:, :, i] - M[:, :, i] @ S
        S0 = torch.stack(starts, 2)  # [B, H, g, K, V]
        u = u0 if w is None else u0 - w @ S0
        outs.append(scale * ((qg * eb) @ S0 + qk @ u))  # [B, H, g, C, V]
    o = torch.cat(outs, 2)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :N]
    return (o, S) if output_final_state else o


__all__ = ["GROUP_ELEMENTS", "gated_scan_chunked"]
