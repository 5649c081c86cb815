"""PyTorch reference of InfSA and Linear-InfSA over ``[B, N, H, D]``: the CPU path and the test oracle.

Everything is computed in fp32 (fp64 for fp64 inputs) and cast to the input dtype once at the end.
Arguments are validated by the public functions in ``__init__``. See there for the equations.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor

Rho = Union[float, Tensor]


def accumulation_dtype(t: Tensor) -> torch.dtype:
    """fp64 for fp64 inputs, else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rho(rho: Rho, dtype: torch.dtype):
    return rho.to(dtype) if isinstance(rho, Tensor) else rho


def pure_infsa_scores_naive(q: Tensor, k: Tensor, rho: Rho, eps: float) -> Tensor:
    """``Â = ρ · A / (‖A‖_F + eps)``, ``A = ReLU(Q Kᵀ / d)``, as ``[B, H, N, M]`` in the accumulation dtype."""
    acc = accumulation_dtype(q)
    a = torch.relu(torch.einsum("bnhd,bmhd->bhnm", q.to(acc), k.to(acc)) / q.shape[-1])
    frob = torch.linalg.vector_norm(a, dim=(-2, -1), keepdim=True)
    return _rho(rho, acc) * (a / (frob + eps))


def pure_infsa_naive(q: Tensor, k: Tensor, v: Tensor, rho: Rho, eps: float) -> Tensor:
    """``o = Â V`` with the N×M matrix materialised per (batch, head)."""
    acc = accumulation_dtype(q)
    scores = pure_infsa_scores_naive(q, k, rho, eps)
    return torch.einsum("bhnm,bmhd->bnhd", scores, v.to(acc)).to(q.dtype)


def linear_infsa_scores_naive(q: Tensor, k: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """The pooling weights ``w [B, N, H]``, pooled query ``q̄ [B, H, D]`` and key distribution ``a [B, M, H]``.

    In the accumulation dtype, without ρ: ``w_i = ‖q̂_i‖ / (Σ‖q̂‖ + eps)``, ``q̄ = Σ w_i q̂_i``,
    ``a_j = ReLU(q̄·k̂_j) / (Σ_l ReLU(q̄·k̂_l) + eps)``, with ``q̂ = q/√d``, ``k̂ = k/√d``.
    """
    acc = accumulation_dtype(q)
    scale = q.shape[-1] ** -0.5
    q_hat = q.to(acc) * scale
    energy = torch.relu(torch.linalg.vector_norm(q_hat, dim=-1))  # [B, N, H]; the ReLU is a no-op, as upstream
    w = energy / (energy.sum(1, keepdim=True) + eps)
    q_bar = torch.einsum("bnh,bnhd->bhd", w, q_hat)
    r = torch.relu(torch.einsum("bhd,bmhd->bmh", q_bar, k.to(acc)) * scale)
    a = r / (r.sum(1, keepdim=True) + eps)
    return w, q_bar, a


def linear_infsa_pooled_naive(q: Tensor, k: Tensor, v: Tensor, rho: Rho, eps: float) -> Tensor:
    """The one pooled vector per (batch, head), ``ρ Σ_j a_j v_j``: ``[B, H, Dv]`` in the input dtype."""
    acc = accumulation_dtype(q)
    _, _, a = linear_infsa_scores_naive(q, k, eps)
    return (_rho(rho, acc) * torch.einsum("bmh,bmhd->bhd", a, v.to(acc))).to(q.dtype)
