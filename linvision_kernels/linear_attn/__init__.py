"""Bidirectional (non-causal) linear attention over ``[B, N, H, D]``, feature maps applied by the caller or fused in."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..backend import resolve_backend
from ..validation import (
    check_bool,
    check_choice,
    check_float,
    check_optional,
    check_qkv,
    check_triton_dtype,
    expand_floating,
)
from .feature_maps import FEATURE_MAPS
from .naive import chunk_tokens, linear_attention_naive
from .state import LinearAttentionState, apply_state, state_of

NORMALIZATIONS = ("div", "sub", "none")


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    q_den: Optional[Tensor] = None,
    k_den: Optional[Tensor] = None,
    k_weight: Optional[Tensor] = None,
    v_weight: Optional[Tensor] = None,
    normalize: str = "div",
    mean: bool = False,
    eps: float = 1e-6,
    scale: Optional[float] = None,
    feature_map: Optional[str] = None,
    feature_offset: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Non-causal linear attention in O(N·D²): every query sees every key.

    Shapes: ``q [B, N, H, Dk]``, ``k [B, M, H, Dk]``, ``v [B, M, H, Dv]`` → ``o [B, N, H, Dv]``.
    Feature maps (ELU+1, ReLU, power kernels, RoPE, ...) are the caller's. With
    ``c = M`` if ``mean`` else ``1`` (the 1/N "mean" convention of LinFusion, LiT, LINA, NaLaFormer):

    - ``S = Σ_j (wk_j k_j)(wv_j v_j)ᵀ / c``,  ``z = Σ_j wk_j kd_j / c``,  ``v̄ = Σ_j wv_j v_j / c``
    - ``normalize="div"``:  ``o_i = q_i S / (qd_i·z + eps)``  (eps on the mean when ``mean=True``)
    - ``normalize="sub"``:  ``o_i = s·q_i S + (1 − s·qd_i·z)·v̄``  (LINA's subtraction/InLine form, ``s = scale``)
    - ``normalize="none"``: ``o_i = s·q_i S``

    ``feature_map`` (``"relu"``, ``"elu+1"`` or None) and ``feature_offset`` give ``φ(t) = map(t) + offset``,
    applied by the kernel to ``q, k`` (and ``q_den, k_den``) as it reads them, so no mapped copy of Q
    and K is ever stored; with ``None`` the inputs are taken as already mapped.
    ``qd, kd`` are ``q_den, k_den`` when given (features of the denominator that differ from the
    numerator's, e.g. NaLaFormer's RoPE in the numerator only; shape ``[B, ·, H, Dd]``), else ``q, k``.
    ``k_weight``, ``v_weight``: per-token weights broadcastable to ``[B, M, H]`` (LINA's KV gate); the
    key weight enters numerator and denominator. Prefix tokens are ordinary tokens here: they join the sums.

    States, normalisers and accumulators are fp32 (fp64 for fp64 inputs on the torch backend); the
    output has the input dtype. ``backend``: ``"auto"`` (Triton on CUDA, else PyTorch), ``"torch"``, ``"triton"``.
    """
    args = _validated(q, k, v, q_den, k_den, k_weight, v_weight, normalize, scale)
    check_bool("mean", mean)
    eps = check_float("eps", eps, min=0.0)
    feature_map = check_optional(check_choice, "feature_map", feature_map, tuple(FEATURE_MAPS))
    feature_offset = check_float("feature_offset", feature_offset, min=0.0)
    chosen = resolve_backend(backend, q, k, v)
    if chosen == "triton":
        check_triton_dtype(q)
        from .triton import linear_attention_triton

        # φ is applied inside the kernels as q, k (and q_den, k_den) are loaded: no mapped copy is stored.
        return linear_attention_triton(
            *args[:-1], normalize=normalize, mean=mean, eps=eps, scale=args[-1],
            feature_map=feature_map, feature_offset=feature_offset,
        )
    return linear_attention_naive(*args[:-1], normalize, mean, eps, args[-1], feature_map, feature_offset)


def _validated(q, k, v, q_den, k_den, k_weight, v_weight, normalize, scale):
    """Check shapes, dtypes and options; return (q, k, v, q_den, k_den, k_weight, v_weight, scale)."""
    check_choice("normalize", normalize, NORMALIZATIONS)
    if normalize == "div" and scale is not None:
        raise ValueError("scale cancels in normalize='div'; it applies to 'sub' and 'none' only")
    scale = 1.0 if scale is None else check_float("scale", scale)
    check_qkv(q, k, v, cross=True)
    B, N, H = q.shape[:3]
    M = k.shape[1]
    if M == 0:
        raise ValueError("linear attention needs at least one key token")
    if (q_den is None) != (k_den is None):
        raise ValueError("q_den and k_den must be given together")
    if q_den is not None:
        if q_den.dim() != 4 or k_den.dim() != 4:
            raise ValueError("q_den and k_den must be 4-D tensors [B, N, H, Dd]")
        if q_den.shape[:3] != (B, N, H) or k_den.shape[:3] != (B, M, H) or q_den.shape[3] != k_den.shape[3]:
            raise ValueError(
                f"q_den {tuple(q_den.shape)} / k_den {tuple(k_den.shape)} do not match q {tuple(q.shape)} / k {tuple(k.shape)}"
            )
        if q_den.dtype != q.dtype or k_den.dtype != q.dtype:
            raise ValueError("q_den and k_den must have the dtype of q")
    target = f"[B, M, H] = [{B}, {M}, {H}]"
    weights = [None if w is None else expand_floating(name, w, (B, M, H), target)
               for name, w in (("k_weight", k_weight), ("v_weight", v_weight))]
    return q, k, v, q_den, k_den, weights[0], weights[1], scale


__all__ = [
    "NORMALIZATIONS",
    "LinearAttentionState",
    "apply_state",
    "chunk_tokens",
    "linear_attention",
    "state_of",
]
