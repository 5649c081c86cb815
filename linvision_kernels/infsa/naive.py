"""PyTorch reference of InfSA and Linear-InfSA over ``[B, N, H, D]``: the CPU path and the test oracle.

Everything is computed in fp32 (fp64 for fp64 inputs) and cast to the input dtype once at the end.
Arguments are validated by the public functions in ``__init__``. See there for the equations.
"""
from __future__ import annotations

from typing import Callable, Tuple, Union

import torch
from torch import Tensor

Rho = Union[float, Tensor]
Rows = Callable[[int, int], Tensor]  # (a, b) → rows a:b of a [B, N, H, D] tensor
KeyRows = Callable[[int, int], Tuple[Tensor, Tensor]]  # (a, b) → (k [B, b − a, H, D], v [B, b − a, H, Dv])
CHUNK_ELEMENTS = 1 << 18  # elements of one [B, chunk, H, D] chunk of queries or keys


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


def chunk_tokens(t: Tensor) -> int:
    """Tokens per chunk for rows like ``t [B, ·, H, D]``: about :data:`CHUNK_ELEMENTS` elements, at least 64."""
    B, _, H, D = t.shape
    return max(64, CHUNK_ELEMENTS // max(1, (B if isinstance(B, int) else 1) * H * D))


def pooled_query(queries: Rows, num_queries: int, step: int, eps: float) -> Tuple[Tensor, torch.dtype]:
    """``(q̄, dtype of the queries)``: ``q̄ = Σ_i ‖q̂_i‖ q̂_i / (Σ_l ‖q̂_l‖ + eps)`` ``[B, H, D]`` in the accumulation
    dtype, ``q̂ = q/√d``, both sums taken over chunks of ``step`` queries ``queries(a, b) [B, b − a, H, D]`` (never
    all of them at once)."""
    energy_sum = weighted = None
    for a in range(0, num_queries, step):
        q = queries(a, min(a + step, num_queries))
        q_hat = q.to(accumulation_dtype(q)) * q.shape[-1] ** -0.5
        energy = torch.relu(torch.linalg.vector_norm(q_hat, dim=-1))  # [B, n, H]; the ReLU is a no-op, as upstream
        part_e, part_q = energy.sum(1), torch.einsum("bnh,bnhd->bhd", energy, q_hat)
        energy_sum = part_e if energy_sum is None else energy_sum + part_e
        weighted = part_q if weighted is None else weighted + part_q
    return weighted / (energy_sum[..., None] + eps), q.dtype


def pooled_value(q_bar: Tensor, keys: KeyRows, num_keys: int, step: int, eps: float) -> Tensor:
    """``Σ_j a_j v_j`` ``[B, H, Dv]`` (accumulation dtype, no ρ) with ``a_j = r_j / (Σ_l r_l + eps)``,
    ``r_j = ReLU(q̄·k̂_j)``: both sums over chunks of ``step`` keys ``keys(a, b) → (k, v)``."""
    r_sum = rv = None
    for a in range(0, num_keys, step):
        k, v = keys(a, min(a + step, num_keys))
        r = torch.relu(torch.einsum("bhd,bmhd->bmh", q_bar, k.to(q_bar.dtype)) * k.shape[-1] ** -0.5)
        part_r, part_v = r.sum(1), torch.einsum("bmh,bmhd->bhd", r, v.to(q_bar.dtype))
        r_sum = part_r if r_sum is None else r_sum + part_r
        rv = part_v if rv is None else rv + part_v
    return rv / (r_sum[..., None] + eps)


def linear_infsa_pooled_chunked(queries: Rows, keys: KeyRows, num_queries: int, num_keys: int, step: int,
                                rho: Rho, eps: float) -> Tensor:
    """The pooled vector ``ρ Σ_j a_j v_j`` ``[B, H, Dv]`` from rows given by range: ``queries(a, b)``, ``keys(a, b)``
    (see :func:`pooled_query`, :func:`pooled_value`), in the dtype of the queries. Two passes of chunks of
    ``step`` tokens, first over the queries, then over the keys: no ``[B, N, H, ·]`` tensor is made."""
    q_bar, dtype = pooled_query(queries, num_queries, step, eps)
    return (_rho(rho, q_bar.dtype) * pooled_value(q_bar, keys, num_keys, step, eps)).to(dtype)


def linear_infsa_pooled_naive(q: Tensor, k: Tensor, v: Tensor, rho: Rho, eps: float) -> Tensor:
    """The one pooled vector per (batch, head), ``ρ Σ_j a_j v_j``: ``[B, H, Dv]`` in the input dtype (chunks of
    :func:`chunk_tokens` tokens, no full-size temporary)."""
    return linear_infsa_pooled_chunked(lambda a, b: q[:, a:b], lambda a, b: (k[:, a:b], v[:, a:b]), q.shape[1],
                                       k.shape[1], chunk_tokens(q), rho, eps)
