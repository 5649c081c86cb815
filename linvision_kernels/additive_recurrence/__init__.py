"""LightNet's additive (log-sum-exp normalised) recurrence over ``[B, N, H, D]``, non-causal or causal.

Paper: Qin et al., "You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet",
arXiv 2405.21022 (2024).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from ..backend import resolve_backend
from ..chunks import Rows, stack_chunks, token_source
from ..validation import check_bool, check_float, check_floating_dtype, check_qkv, check_triton_dtype, expand_floating
from .naive import (
    additive_scan_naive, additive_scan_recurrent, causal_lse, chunk_tokens, noncausal_scan_of, noncausal_state,
)


def additive_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    k_mod: Optional[Tensor] = None,
    causal: bool = False,
    lse_init: float = -math.inf,
    out_dtype: Optional[torch.dtype] = None,
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
    backend); the output has ``out_dtype``, default the input dtype (``torch.float32`` keeps an fp16
    result that a norm follows from overflowing). ``backend``: ``"auto"`` (Triton on CUDA, else PyTorch),
    ``"torch"``, ``"triton"``. The Triton backend is differentiable in ``q``, ``k``, ``v`` and ``k_mod``.
    """
    k_mod, lse_init = _validated(q, k, v, k_mod, causal, lse_init)
    out_dtype = q.dtype if out_dtype is None else check_floating_dtype("out_dtype", out_dtype)
    chosen = resolve_backend(backend, q, k, v)
    if chosen == "triton":
        check_triton_dtype(q)
        from .triton import additive_scan_triton

        return additive_scan_triton(q, k, v, k_mod, causal=causal, lse_init=lse_init, out_dtype=out_dtype)
    return additive_scan_naive(q, k, v, k_mod, causal, lse_init, out_dtype)


def additive_scan_streamed(
    queries: Callable[[int, int], Tensor],
    keys: Callable[[int, int], Tuple[Tensor, Optional[Tensor]]],
    v: Union[Tensor, Rows],
    num_queries: int,
    *,
    num_keys: Optional[int] = None,
    lse_init: float = -math.inf,
    out_dtype: Optional[torch.dtype] = None,
    output: Optional[Callable[[int, int, Tensor], Tensor]] = None,
    backend: str = "auto",
) -> Tensor:
    """The non-causal :func:`additive_scan` with ``q = queries(0, N)`` and ``(k, k_mod) = keys(0, N)`` built by
    the caller one chunk of tokens at a time (``queries(a, b)``, ``keys(a, b)``: tokens ``a:b``, computed
    token by token), so that the PyTorch path never holds a full-size temporary of them; the outputs are
    bit-identical to :func:`additive_scan` on the full tensors. The Triton path builds them over all tokens.
    ``v [B, M, H, Dv]``, or a function ``v(a, b)`` of a token range with ``num_keys = M`` (never held whole then).

    ``output(a, b, o)``: a token-wise epilogue of each chunk ``o [B, b − a, H, Dv]`` of the result (the caller's
    gate, norm and projection); the result is then the stacked ``output`` chunks, and on the PyTorch path the
    scan's output is never held whole.
    """
    values, M, sample = token_source(v, num_keys)
    if resolve_backend(backend, sample) == "triton":
        k, k_mod = keys(0, M)
        o = additive_scan(queries(0, num_queries), k, values(0, M), k_mod=k_mod, lse_init=lse_init,
                          out_dtype=out_dtype, backend=backend)
        return o if output is None else stack_chunks(lambda a, b: output(a, b, o[:, a:b]), num_queries, chunk_tokens(o))
    step = min(num_queries, M, 64)
    k, k_mod = keys(0, step)  # the checks of additive_scan, once, on a first chunk
    q = queries(0, step)
    _, lse_init = _validated(q, k, values(0, step), k_mod, False, lse_init)
    out_dtype = q.dtype if out_dtype is None else check_floating_dtype("out_dtype", out_dtype)
    return noncausal_scan_of(queries, keys, values, num_queries, lse_init, out_dtype, output, num_keys=M)


def _validated(q, k, v, k_mod, causal, lse_init):
    """Check shapes, dtypes and options; return ``k_mod`` expanded to ``k``'s shape (or None) and ``lse_init``
    as a float."""
    check_qkv(q, k, v)
    if q.shape[1] == 0:
        raise ValueError("the additive scan needs at least one token")
    if q.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError("head dimensions must be positive")
    if k_mod is not None:
        k_mod = expand_floating("k_mod", k_mod, k.shape, str(tuple(k.shape)))
    check_bool("causal", causal)
    return k_mod, check_float("lse_init", lse_init, allow_neg_inf=True)


__all__ = ["additive_scan", "additive_scan_streamed", "additive_scan_naive", "additive_scan_recurrent", "causal_lse", "noncausal_state"]
