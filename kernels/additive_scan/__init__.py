"""LightNet's additive (log-sum-exp normalised) recurrence over ``[B, N, H, D]``, non-causal or causal.

Paper: Qin et al., "You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet",
arXiv 2405.21022 (2024).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..backend import KERNEL_DTYPES, resolve_backend
from .naive import additive_scan_naive, additive_scan_recurrent, causal_lse, noncausal_state


def additive_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    k_mod: Optional[Tensor] = None,
    causal: bool = False,
    lse_init: float = -math.inf,
    backend: str = "auto",
) -> Tensor:
    """LightNet's additive recurrence: a per-channel softmax of the keys over the tokens weights the values.

    Shapes: ``q [B, N, H, Dk]``, ``k [B, N, H, Dk]`` (the log-weights ``f``; LightNet feeds the raw key
    projection), ``v [B, N, H, Dv]`` → ``o [B, N, H, Dv]``. ``k_mod`` (``κ``, broadcastable to ``[B, N, H, Dk]``,
    any floating dtype, may be negative) multiplies the normalised key weights: this is how LRPE's
    ``[cos Θ, sin Θ]`` enters (``k`` then holds ``[f, f]``). Per channel ``c`` and head, with ``z₀ = lse_init``:

    - non-causal (the "You Only Scan Once" form): ``z = log(e^{z₀} + Σ_j e^{f_j})``,
      ``S = Σ_j e^{f_j − z} ⊙ κ_j v_jᵀ`` ``[Dk, Dv]``, ``o_i = q_iᵀ S``. Permutation-invariant in the
      tokens, so one pass covers any number of dimensions.
    - causal (raster order): ``z_t = log(e^{z₀} + Σ_{s≤t} e^{f_s})``,
      ``S_t = Σ_{s≤t} e^{f_s − z_t} ⊙ κ_s v_sᵀ``, ``o_t = q_tᵀ S_t``. This equals LightNet's multiplicative
      recurrence ``S_t = diag(e^{z_{t−1} − z_t}) S_{t−1} + e^{f_t − z_t} κ_t v_tᵀ``; at the last token it
      equals the non-causal output.

    ``lse_init = −inf`` (default) is a pure softmax over the tokens (FLA's initial state);
    ``lse_init = 0`` reproduces xmixers' ``lse_state = 0`` (an extra null key of log-weight 0).
    The log-sum-exp is computed in fp32 with a running maximum, so keys of any finite magnitude give
    finite outputs; a channel whose keys are all −inf (with ``lse_init = −inf``) has no softmax and is
    undefined. States, normalisers and accumulators are fp32 (fp64 for fp64 inputs on the torch
    backend); the output has the input dtype. ``backend``: ``"auto"`` (Triton on CUDA, else PyTorch),
    ``"torch"``, ``"triton"``. The Triton backend is differentiable in ``q``, ``k``, ``v`` and ``k_mod``.
    """
    lse_init = _validated(q, k, v, k_mod, causal, lse_init)
    if k_mod is not None:
        k_mod = k_mod.expand(k.shape)
    chosen = resolve_backend(backend, q, k, v)
    if chosen == "triton":
        if q.dtype == torch.float64:
            raise ValueError("the Triton backend takes fp16, bf16 or fp32; use backend='torch' for fp64")
        from .triton import additive_scan_triton

        return additive_scan_triton(q, k, v, k_mod, causal=bool(causal), lse_init=lse_init)
    return additive_scan_naive(q, k, v, k_mod, bool(causal), lse_init)


def _validated(q, k, v, k_mod, causal, lse_init) -> float:
    """Check shapes, dtypes and options; return ``lse_init`` as a float."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, N, H, D], got shape {tuple(getattr(t, 'shape', ()))}")
    if q.dtype not in KERNEL_DTYPES + (torch.float64,):
        raise ValueError(f"unsupported dtype {q.dtype}; expected fp16, bf16, fp32 or fp64")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, N, H, Dv] = [{q.shape[0]}, {q.shape[1]}, {q.shape[2]}, Dv], got {tuple(v.shape)}")
    if q.shape[1] == 0:
        raise ValueError("the additive scan needs at least one token")
    if q.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError("head dimensions must be positive")
    if k_mod is not None:
        if not isinstance(k_mod, Tensor) or not k_mod.is_floating_point() or k_mod.dim() > 4:
            raise ValueError(f"k_mod must be a floating tensor that broadcasts to {tuple(k.shape)}")
        try:
            torch.broadcast_shapes(k_mod.shape, k.shape)
            k_mod.expand(k.shape)
        except RuntimeError:
            raise ValueError(f"k_mod of shape {tuple(k_mod.shape)} does not broadcast to {tuple(k.shape)}") from None
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    try:
        lse_init = float(lse_init)
    except (TypeError, ValueError):
        raise ValueError(f"lse_init must be a float (or -inf), got {lse_init!r}") from None
    if math.isnan(lse_init) or lse_init == math.inf:
        raise ValueError(f"lse_init must be finite or -inf, got {lse_init}")
    return lse_init


__all__ = ["additive_scan", "additive_scan_naive", "additive_scan_recurrent", "causal_lse", "noncausal_state"]
