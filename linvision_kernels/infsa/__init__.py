"""InfSA and Linear-InfSA (Roffo & Palmer, "Infinite Self-Attention", arXiv 2603.00175) over ``[B, N, H, D]``.

Follows ``giorgioroffo/infinite-self-attention`` at commit ``4a37fc0`` (``infsa/core.py``:
``pure_infsa_scores``, ``linear_infsa_scores``, ``infsa_attention``). Per (batch, head), with
``q̂ = q/√d``, ``k̂ = k/√d``:

**Pure InfSA** (:func:`pure_infsa`, quadratic)::

    A = ReLU(q̂ k̂ᵀ)                       # N×M; 1/d total score scaling, as upstream
    Â = ρ · A / (‖A‖_F + eps)             # Frobenius norm over the whole N×M matrix
    o = Â V

**Linear InfSA** (:func:`linear_infsa`, upstream's default semantics)::

    w_i = ‖q̂_i‖ / (Σ_l ‖q̂_l‖ + eps)       # "energy" pooling of the queries
    q̄   = Σ_i w_i q̂_i
    a_j = ReLU(q̄·k̂_j) / (Σ_l ReLU(q̄·k̂_l) + eps)
    o_i = ρ Σ_j a_j v_j                   # ONE vector, the same for every query i (rank-1 mixing)

``a`` is one power-iteration-like step toward the principal left eigenvector of ``ReLU(Q̂K̂ᵀ)``.

Options and deviations from upstream (outputs identical unless stated):

- ``rho`` is a float or a 0-dim tensor. Upstream reads ``sigmoid(rho_logit).item()``, a constant; a tensor
  that requires grad here receives its gradient (the "learnable ρ" fix lives in the mixer).
- ``linear_infsa(per_token=True)`` (a fix of the rank-1 output, **changes outputs**): every query uses its
  own ``q̂_i`` instead of ``q̄``, with the ReLU moved onto the features so that the cost stays linear:
  ``o_i = ρ Σ_j (φ(q̂_i)·φ(k̂_j)) v_j / (Σ_l φ(q̂_i)·φ(k̂_l) + eps)``, ``φ = ReLU``. It runs on
  :func:`linvision.kernels.linear_attn.linear_attention`.
- :func:`linear_infsa` returns the pooled vector broadcast as a stride-0 view ``[B, N, H, Dv]`` (like
  upstream's ``expand_as``); :func:`linear_infsa_pooled` returns the ``[B, H, Dv]`` vector itself.
- :func:`linear_infsa_pooled_streamed` takes the query and key/value rows as functions of a token range and,
  on the PyTorch path, sums ``q̄`` and ``Σ_j a_j v_j`` over chunks of tokens (a caller's projection then
  happens chunk by chunk); the PyTorch :func:`linear_infsa_pooled` runs the same chunked sums on its tensors.
- The Triton pure InfSA never materialises the N×M matrix (flash-style, two reductions in one pass);
  the PyTorch reference does.
- Masks and causality: upstream accepts and ignores them; these functions take none.

Accumulation in fp32 (fp64 for fp64 inputs); outputs in the input dtype. ``backend``: ``"auto"``
(Triton on CUDA, else PyTorch), ``"torch"``, ``"triton"`` (CPU tensors need ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

from typing import Callable, Tuple, Union

from torch import Tensor

from ..backend import resolve_backend
from ..validation import check_bool, check_float, check_qkv, check_triton_dtype
from .naive import (
    KeyRows,
    Rows,
    linear_infsa_pooled_chunked,
    linear_infsa_pooled_naive,
    linear_infsa_scores_naive,
    pure_infsa_naive,
    pure_infsa_scores_naive,
)

Rho = Union[float, Tensor]
DEFAULT_RHO = 0.95
DEFAULT_EPS = 1e-6


def pure_infsa(q: Tensor, k: Tensor, v: Tensor, *, rho: Rho = DEFAULT_RHO, eps: float = DEFAULT_EPS, backend: str = "auto") -> Tensor:
    """Pure InfSA ``o = ρ · ReLU(Q̂K̂ᵀ)/(‖ReLU(Q̂K̂ᵀ)‖_F + eps) · V``.

    Shapes: ``q [B, N, H, D]``, ``k [B, M, H, D]``, ``v [B, M, H, Dv]`` → ``o [B, N, H, Dv]``.
    O(N·M·D) time; the Triton path needs O(N) memory, the PyTorch path holds the N×M matrix.
    """
    return _dispatch(q, k, v, rho, eps, backend, pure_infsa_naive, "pure_infsa_triton")


def linear_infsa_pooled(
    q: Tensor, k: Tensor, v: Tensor, *, rho: Rho = DEFAULT_RHO, eps: float = DEFAULT_EPS, backend: str = "auto"
) -> Tensor:
    """Linear InfSA's pooled vector ``ρ Σ_j a_j v_j`` per (batch, head): ``[B, H, Dv]``, O(N·D)."""
    return _dispatch(q, k, v, rho, eps, backend, linear_infsa_pooled_naive, "linear_infsa_pooled_triton")


def linear_infsa_pooled_streamed(
    queries: Rows, keys: KeyRows, num_queries: int, num_keys: int, *, step: int, rho: Rho = DEFAULT_RHO,
    eps: float = DEFAULT_EPS, backend: str = "auto",
) -> Tensor:
    """:func:`linear_infsa_pooled` of ``q = queries(0, N)``, ``(k, v) = keys(0, M)`` given by token range
    (``queries(a, b) [B, b − a, H, D]``, ``keys(a, b) → (k [B, b − a, H, D], v [B, b − a, H, Dv])``, token-wise:
    the same rows for a range as for the whole sequence sliced to it), ``[B, H, Dv]``.

    On the PyTorch path the sums run over chunks of ``step`` tokens, one pass over the queries and one over the
    keys, so no ``[B, N, H, ·]`` tensor is held (a caller's projection can happen chunk by chunk). The Triton path
    builds ``q, k, v`` whole, checks them and runs :func:`linear_infsa_pooled`; the PyTorch path checks ρ and
    eps only. ``backend`` is resolved on the first chunk of queries.
    """
    first = queries(0, min(step, num_queries))
    if resolve_backend(backend, first) == "triton":
        k, v = keys(0, num_keys)
        return linear_infsa_pooled(queries(0, num_queries), k, v, rho=rho, eps=eps, backend=backend)
    if not isinstance(rho, Tensor):
        rho = check_float("rho", rho)
    rows = lambda a, b: first if (a, b) == (0, first.shape[1]) else queries(a, b)  # noqa: E731
    return linear_infsa_pooled_chunked(rows, keys, num_queries, num_keys, step, rho, check_float("eps", eps, min=0.0))


def linear_infsa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    rho: Rho = DEFAULT_RHO,
    eps: float = DEFAULT_EPS,
    per_token: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Linear InfSA ``[B, N, H, Dv]``: upstream's pooled vector for every query, or ``per_token`` queries.

    Without ``per_token`` the result is a stride-0 broadcast view of :func:`linear_infsa_pooled` (all N
    rows equal per head; ``.contiguous()`` it before writing in place). See the module docstring.
    """
    check_bool("per_token", per_token)
    if per_token:
        rho = _validated(q, k, v, rho, eps)
        from ..linear_attn import linear_attention

        # φ(q/√d)·φ(k/√d) = φ(q)·φ(k)/d: scale the eps instead of the inputs (no scaled copies).
        o = linear_attention(q, k, v, feature_map="relu", eps=float(eps) * q.shape[-1], backend=backend)
        return o * (rho.to(o.dtype) if isinstance(rho, Tensor) else rho)
    pooled = linear_infsa_pooled(q, k, v, rho=rho, eps=eps, backend=backend)
    B, N, H = q.shape[:3]
    return pooled.unsqueeze(1).expand(B, N, H, pooled.shape[-1])


def pure_infsa_scores(q: Tensor, k: Tensor, *, rho: Rho = DEFAULT_RHO, eps: float = DEFAULT_EPS) -> Tensor:
    """The pure InfSA matrix ``Â [B, H, N, M]`` (PyTorch; fp32, or fp64 for fp64 inputs). For analysis."""
    rho = _validated(q, k, k, rho, eps)
    return pure_infsa_scores_naive(q, k, rho, float(eps))


def linear_infsa_scores(q: Tensor, k: Tensor, *, eps: float = DEFAULT_EPS) -> Tuple[Tensor, Tensor, Tensor]:
    """Linear InfSA's pooling weights ``w [B, N, H]``, pooled query ``q̄ [B, H, D]`` and key distribution
    ``a [B, M, H]`` (ρ not applied; PyTorch; fp32, or fp64 for fp64 inputs). For analysis."""
    _validated(q, k, k, 1.0, eps)
    return linear_infsa_scores_naive(q, k, float(eps))


def _dispatch(q, k, v, rho, eps, backend: str, naive: Callable, triton_name: str) -> Tensor:
    """Validate, then run the reference ``naive`` or the Triton function ``triton_name`` of :mod:`.triton`
    (imported only when chosen); the Triton kernels also take fp64 CPU tensors under the interpreter."""
    rho = _validated(q, k, v, rho, eps)
    if resolve_backend(backend, q, k, v) == "triton":
        check_triton_dtype(q, interpreter_fp64=True)
        from . import triton as kernels

        return getattr(kernels, triton_name)(q, k, v, rho, float(eps))
    return naive(q, k, v, rho, float(eps))


def _validated(q, k, v, rho, eps) -> Rho:
    """Check shapes, dtypes, ρ and eps; return ρ as a float or a 0-dim tensor."""
    check_qkv(q, k, v, cross=True, dk="D")
    B, N, H, D = q.shape
    M = k.shape[1]
    if N == 0 or M == 0 or D == 0:
        raise ValueError(f"InfSA needs at least one query, one key and one channel, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_float("eps", eps, min=0.0)
    if isinstance(rho, Tensor):
        if rho.numel() != 1 or not rho.is_floating_point():
            raise ValueError(f"rho must be a float or a one-element floating tensor, got shape {tuple(rho.shape)}, {rho.dtype}")
        return rho.reshape(())
    return check_float("rho", rho)


__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_RHO",
    "linear_infsa",
    "linear_infsa_pooled",
    "linear_infsa_pooled_streamed",
    "linear_infsa_scores",
    "pure_infsa",
    "pure_infsa_scores",
]
