"""Chunked form of the gated / delta-rule scan: the PyTorch reference and CPU path of ``gated_scan``.

Tokens are cut into chunks of ``C``; inside a chunk everything is a ``C × C`` product, across chunks an fp32
state ``S [B, H, Dk, Dv]`` is passed (the Lightning-Attention-2 / fla chunk scheme). With ``b_t`` the
cumulative log decay inside the chunk (per key channel) and ``Γ_t = diag(exp b_t)``:

- non-delta: ``u_t = v_t``;
- delta rule, WY / UT representation (as fla's chunk kernels): the new values solve the unit lower-triangular
  system ``(I + A) U = diag(β) V − diag(β) (K ⊙ e^b) S_0`` with ``A_ts = β_t Σ_c k_tc k_sc e^{b_tc − b_sc}``
  (``s < t``), so ``U = U₀ − W S_0`` with ``U₀ = T β V``, ``W = T β (K ⊙ e^b)``, ``T = (I + A)^{-1}``;
  ``U₀`` and ``W`` depend on the chunk only and are computed for all chunks at once;
- outputs ``o_t = scale·[(q_t ⊙ e^{b_t})ᵀ S_0 + Σ_{s ≤ t} (Σ_c q_tc k_sc e^{b_tc − b_sc}) u_s]`` (``s < t`` when
  exclusive), next state ``S_C = Γ_C S_0 + Σ_s (k_s ⊙ e^{b_C − b_s}) u_sᵀ``.

Only the state recursion runs chunk after chunk. Pairwise decays are masked before ``exp`` (no overflow for
``g ≤ 0``). Gradients come from autograd through these tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _chunks(t: Tensor, C: int) -> Tensor:
    """``[B, N, H, *]`` (N a multiple of C) → ``[B, H, N/C, C, *]``."""
    B, N, H = t.shape[:3]
    return t.reshape(B, N // C, C, H, *t.shape[3:]).transpose(2, 3).transpose(1, 2)


def gated_scan_chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor], scale: float,
    exclusive: bool = False, chunk_size: int = 32,
) -> Tensor:
    """Forward-direction scan, same contract as :func:`.naive.gated_scan_naive`; ``g [B, N, H, 1 or Dk]``."""
    B, N, H, K = q.shape
    V = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = chunk_size
    pad = (-N) % C
    q, k, v = (F.pad(t.to(dt), (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    if g is None:
        g = q.new_zeros(B, N + pad, H, 1)
    else:
        g = F.pad(g.to(dt), (0, 0, 0, 0, 0, pad))
    qc, kc, vc = _chunks(q, C), _chunks(k, C), _chunks(v, C)  # [B, H, n, C, D]
    b = _chunks(g, C).cumsum(3)  # [B, H, n, C, 1 or K]
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = lower.tril(-1)
    diff = b[..., :, None, :] - b[..., None, :, :]  # [B, H, n, C(t), C(s), 1 or K]
    decay_ts = diff.masked_fill(~lower[..., None], float("-inf")).exp()
    if g.shape[-1] == 1:
        qk = (qc @ kc.transpose(-1, -2)) * decay_ts[..., 0]
        kk = (kc @ kc.transpose(-1, -2)) * decay_ts[..., 0]
    else:
        qk = torch.einsum("bhntk,bhnsk,bhntsk->bhnts", qc, kc, decay_ts)
        kk = torch.einsum("bhntk,bhnsk,bhntsk->bhnts", kc, kc, decay_ts)
    qk = qk.masked_fill(~(strict if exclusive else lower), 0.0)
    eb = b.exp()
    q_dec, k_dec = qc * eb, kc * eb  # q_t ⊙ e^{b_t}, k_t ⊙ e^{b_t}
    k_tail = kc * (b[..., -1:, :] - b).exp()  # k_s ⊙ e^{b_C − b_s}
    if beta is not None:
        bc = _chunks(F.pad(beta.to(dt), (0, 0, 0, pad))[..., None], C)  # [B, H, n, C, 1]
        A = (bc * kk).masked_fill(~strict, 0.0) + torch.eye(C, dtype=dt, device=q.device)
        rhs = torch.cat([bc * vc, bc * k_dec], -1)
        sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
        u0, w = sol[..., :V], sol[..., V:]
    else:
        u0, w = vc, None
    S = q.new_zeros(B, H, K, V)
    starts = []
    for n in range(qc.shape[2]):
        starts.append(S)
        u = u0[:, :, n] if w is None else u0[:, :, n] - w[:, :, n] @ S
        S = eb[:, :, n, -1][..., None] * S + k_tail[:, :, n].transpose(-1, -2) @ u
    S0 = torch.stack(starts, 2)  # [B, H, n, K, V]
    u = u0 if w is None else u0 - w @ S0
    o = scale * (q_dec @ S0 + qk @ u)  # [B, H, n, C, V]
    return _unchunk(o)[:, :N]


def _unchunk(o: Tensor) -> Tensor:
    """``[B, H, n, C, V]`` → ``[B, n·C, H, V]``."""
    B, H, n, C, V = o.shape
    return o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)


__all__ = ["gated_scan_chunked"]
