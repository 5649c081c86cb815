"""Triton forward and backward of LightNet's additive recurrence over ``[B, N, H, D]``.

Equations: see :func:`linvision.kernels.additive_recurrence.additive_scan`. Notation per head and channel ``c``:
``f = k`` (log-weights), ``κ`` = ``k_mod`` (1 when absent), ``z₀ = lse_init``,
``P_j = e^{f_j − z}`` (softmax weights), ``K̄_j = P_j ⊙ κ_j``, ``S = Σ_j K̄_j v_jᵀ``, ``o_i = q_iᵀ S``.

Non-causal kernel plan
----------------------
Forward, two launches plus a tiny torch combine over a bounded partial buffer:

1. ``_nc_state_fwd``, grid ``(B·H, n_split, Dv tiles)``: each program owns a contiguous range of token
   blocks and keeps an online, max-referenced softmax per channel: running max ``m`` ``[Dk]``,
   ``l = Σ e^{f−m}`` ``[Dk]`` and ``acc = Σ e^{f−m} κ vᵀ`` ``[Dk, BLOCK_V]``, all fp32 (``acc`` and ``l``
   are rescaled by ``e^{m_old − m_new}`` whenever the max grows, as in flash attention). It writes one
   partial per split into ``[n_split, B·H, ·]``.
2. :func:`_combine` (torch, fp32, deterministic): ``M = max(max_s m_s, z₀)``, ``w_s = e^{m_s − M}``,
   ``L = Σ_s w_s l_s + e^{z₀ − M}``, ``S = Σ_s w_s acc_s / L``, ``z = M + log L``.
3. ``_nc_out_fwd``, a flat grid over ``(query block, B·H)``: ``o = q S`` (fp32 ``tl.dot``), written in the
   input dtype.

Saved for backward: the inputs and the fp32 ``S [B·H, Dk, Dv]`` and ``z [B·H, Dk]`` only, nothing N-sized.

Backward (``dz_c = −Σ_i q_ic dq_ic = −Σ_e S_ce dS_ce`` because ``∂o/∂z = −q ⊙ (S ·)``):

1. ``_nc_query_bwd``, grid ``(B·H, n_split, Dv tiles)``: ``dq_i = dO_i Sᵀ`` (first Dv-tile program, looping
   over all Dv tiles) and the partial ``dS = Σ_i q_iᵀ dO_i``; torch sums the partials and forms
   ``r = rowsum(dS ⊙ S)`` ``[B·H, Dk]``.
2. ``_nc_key_bwd``, flat grid over ``(key block, B·H)``: recomputes ``P = e^{f − z}``, then
   ``dK̄ = v dSᵀ``, ``dv = K̄ dS``, ``df = P ⊙ (κ ⊙ dK̄ − r)`` (the softmax Jacobian with
   ``Σ_j P_j dP_j = r``), ``dκ = P ⊙ dK̄``.

Split over the sequence: when ``B·H`` is small the two reduction kernels split the tokens into
``n_split`` contiguous ranges (:func:`split_plan`): enough programs for ``PROGRAMS_PER_SM`` per SM,
at most ``MAX_SPLITS``, each split covering at least ``TOKENS_PER_SPLIT_PER_DIM · max(Dk, Dv)`` tokens.
The partial buffers ``[n_split, B·H, Dk, Dv]`` are therefore bounded independently of N.

Causal kernel plan (chunked scan, ``CHUNK = 16`` tokens)
--------------------------------------------------------
``z_t`` is a per-channel log-cum-sum-exp; every exponent the kernels evaluate is ``≤ 0`` (up to rounding),
so keys of any finite magnitude are safe. Per chunk with ``z_prev`` the value at the chunk start:

- ``z_t`` exactly, from the ``[t, s, Dk]`` masked log-sum-exp of ``f_s`` (``s ≤ t``) and ``z_prev``;
- ``o_t = (q_t ⊙ e^{z_prev − z_t}) S_prev + Σ_{s≤t} A_ts v_s``, ``A_ts = Σ_c q_tc κ_sc e^{f_sc − z_tc}``
  (the intra-chunk pair weights are evaluated pair by pair, ``[16, 16, Dk]`` fp32, never factored
  into ``e^{f_s − r} e^{r − z_t}``, which overflows when ``z`` jumps within a chunk);
- ``S ← e^{z_prev − z_last} S + Σ_s (e^{f_s − z_last} κ_s) v_sᵀ`` (the normalised state at the chunk end).

Kernels: ``_c_fwd`` (grid ``(B·H, Dv tiles)``; also stores ``z`` at the ``n_chunks + 1`` chunk
boundaries, ``[B·H, n_chunks + 1, Dk]`` fp32, 1/16 of a K-sized tensor, saved for backward),
``_c_dq`` (grid ``(B·H,)``: the forward scan again, ``dq_t = (S_t dO_t)`` per channel, written in fp32)
and ``_c_bwd`` (grid ``(B·H,)``: the reverse scan with carries ``dS = Σ_{t later} e^{z_ref − z_t} q_tᵀ dO_t``
and ``R = Σ_{t later} e^{z_ref − z_t} q_t ⊙ dq_t``, ``z_ref`` the current chunk end):
``dv_s = K̄'_s dS + Σ_{t≥s} A_ts dO_t``, ``E_s = Σ_{t≥s} q_t e^{f_s − z_t} (v_s·dO_t)``,
``dκ = E``, ``df = κ ⊙ E − e^{f_s} Σ_{t≥s} q_t dq_t e^{−z_t}``. The scan is sequential in N; its
parallelism is ``B·H`` (times the Dv tiles in the forward).

Layout: the non-causal kernels are in :mod:`.triton_noncausal`, the causal ones in :mod:`.triton_causal`;
this module plans the launches and holds the ``autograd.Function``.

Numerics and ``tl.dot``
-----------------------
All ``tl.dot`` operands are fp32 (loaded values are upcast), which also sidesteps the interpreter's broken
bf16 ``tl.dot``; fp32 inputs use ``input_precision="ieee"``, fp16/bf16 inputs ``"tf32"`` (at the fp16
output's rounding level). Inputs are read through their strides (``qkv.reshape(B, N, 3, H, D).unbind(2)``
views and stride-0 broadcast ``k_mod`` need no copy); offsets are int64.

Limits: ``Dk`` and ``Dv`` ≤ 256. The causal kernels hold ``[16, 16, BLOCK_K]`` fp32 pair tensors and a
whole ``[BLOCK_K, BLOCK_V]`` state; ``BLOCK_K > 128`` will spill registers on a GPU (not measured: no GPU
check has been run). Block sizes are fixed heuristics (no autotune), so the interpreter needs no
benchmark driver.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
from torch import Tensor

from ..triton_support import (
    INTERPRETER_SM_COUNT,
    MAX_HEAD_DIM,
    MAX_SPLITS,
    TOKENS_PER_SPLIT_PER_DIM,
    SplitPlan,
    check_head_dims,
    dot_precision,
    plan_splits,
    pow2_block,
    sm_count,
    strides,
    sum_splits,
    value_tile,
)
from .triton_causal import _c_bwd, _c_dq, _c_fwd
from .triton_noncausal import _nc_key_bwd, _nc_out_fwd, _nc_query_bwd, _nc_state_fwd

NONCAUSAL_BLOCK_T: Optional[int] = None  # override of the token block (tests use 16 to exercise the loops)
CAUSAL_CHUNK = 16  # tokens per causal chunk (tl.dot needs ≥ 16)
_MAX_ACC = 128 * 128  # largest fp32 [Dk, BLOCK_V] accumulator tile per non-causal program


# ----------------------------------------------------------------------------------------------------------
# Launch planning
# ----------------------------------------------------------------------------------------------------------


class TileConfig(NamedTuple):
    """Block sizes for one (Dk, Dv)."""

    block_t: int  # tokens per non-causal block
    block_k: int  # Dk, whole, padded to a power of two ≥ 16
    block_v: int  # Dv tile (non-causal kernels and the causal forward)
    block_v_full: int  # Dv, whole (causal backward)
    v_tiles: int
    num_warps: int


def tile_config(dk: int, dv: int) -> TileConfig:
    """Fixed block-size heuristics (no autotune). ``tl.dot`` needs every dimension ≥ 16."""
    check_head_dims("Dk and Dv", Dk=dk, Dv=dv)
    block_k = pow2_block(dk)
    block_v = value_tile(block_k, dv, _MAX_ACC)
    block_t = NONCAUSAL_BLOCK_T or (64 if max(block_k, block_v) <= 64 else 32)
    num_warps = 4 if block_k * block_v <= 64 * 64 else 8
    return TileConfig(block_t, block_k, block_v, pow2_block(dv), triton.cdiv(dv, block_v), num_warps)


def split_plan(seq_len: int, block_t: int, batch_heads: int, v_tiles: int, head_dim: int, sm_count: int) -> SplitPlan:
    """Sequence splits of a non-causal reduction kernel (:func:`..triton_support.plan_splits`), each covering at
    least ``TOKENS_PER_SPLIT_PER_DIM · head_dim`` tokens; at most ``MAX_SPLITS`` whatever ``seq_len``."""
    return plan_splits(seq_len, block_t, batch_heads, v_tiles, sm_count, TOKENS_PER_SPLIT_PER_DIM * head_dim)


def partial_buffer_shapes(seq_len: int, batch: int, heads: int, dk: int, dv: int, sms: int) -> Tuple[Tuple[int, ...], ...]:
    """Shapes of the non-causal fp32 partial buffers (forward and backward): ``S``/``dS`` ``[splits, B·H, Dk, Dv]``
    and ``m``, ``l`` ``[splits, B·H, Dk]``. Bounded by ``MAX_SPLITS`` for any ``seq_len``."""
    cfg = tile_config(dk, dv)
    plan = split_plan(seq_len, cfg.block_t, batch * heads, cfg.v_tiles, max(dk, dv), sms)
    bh = batch * heads
    return (plan.splits, bh, dk, dv), (plan.splits, bh, dk)


def _combine(s_part: Tensor, m_part: Tensor, l_part: Tensor, lse_init: float) -> Tuple[Tensor, Tensor]:
    """Merge the per-split online-softmax partials (and the initial log-sum-exp) into ``S`` and ``z`` (fp32)."""
    big = m_part.amax(0)
    if lse_init != -math.inf:
        big = torch.clamp(big, min=lse_init)
    big = torch.where(torch.isneginf(big), torch.zeros_like(big), big)
    w = torch.exp(m_part - big)  # [splits, BH, Dk]
    total = (w * l_part).sum(0)
    if lse_init != -math.inf:
        total = total + torch.exp(lse_init - big)
    state = (w.unsqueeze(-1) * s_part).sum(0) / total.unsqueeze(-1)
    return state, big + torch.log(total)


# ----------------------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------------------


class _AdditiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_mod, causal, lse_init, out_dtype):
        B, N, H, Dk = q.shape
        Dv = v.shape[3]
        cfg = tile_config(Dk, Dv)
        precision = dot_precision(q.dtype)
        BH = B * H
        dev = q.device
        has_mod = k_mod is not None
        mod = k_mod if has_mod else k
        out = torch.empty((B, N, H, Dv), dtype=out_dtype, device=dev)
        if causal:
            n_chunks = triton.cdiv(N, CAUSAL_CHUNK)
            zb = torch.empty((BH, n_chunks + 1, Dk), dtype=torch.float32, device=dev)
            _c_fwd[(BH, cfg.v_tiles)](
                q, k, v, mod, out, zb,
                N, H, Dk, Dv, n_chunks, float(lse_init),
                *q.stride(), *k.stride(), *v.stride(), *mod.stride(), *out.stride(),
                HAS_MOD=has_mod, CHUNK=CAUSAL_CHUNK, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
                PRECISION=precision, num_warps=cfg.num_warps,
            )
            ctx.save_for_backward(q, k, v, k_mod, zb)
        else:
            plan = split_plan(N, cfg.block_t, BH, cfg.v_tiles, max(Dk, Dv), sm_count(dev))
            f32 = dict(dtype=torch.float32, device=dev)
            s_part = torch.empty((plan.splits, BH, Dk, Dv), **f32)
            m_part = torch.empty((plan.splits, BH, Dk), **f32)
            l_part = torch.empty((plan.splits, BH, Dk), **f32)
            _nc_state_fwd[(BH, plan.splits, cfg.v_tiles)](
                k, v, mod, s_part, m_part, l_part,
                N, H, BH, Dk, Dv, plan.blocks_per_split,
                *k.stride(), *v.stride(), *mod.stride(),
                HAS_MOD=has_mod, BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
                PRECISION=precision, num_warps=cfg.num_warps,
            )
            state, z = _combine(s_part, m_part, l_part, lse_init)
            n_blocks = triton.cdiv(N, cfg.block_t)
            _nc_out_fwd[(BH * n_blocks,)](
                q, state, out,
                N, H, Dk, Dv, n_blocks,
                *q.stride(), *out.stride(),
                BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
                PRECISION=precision, num_warps=cfg.num_warps,
            )
            ctx.save_for_backward(q, k, v, k_mod, state, z)
        ctx.options = (causal, cfg, precision)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        causal, cfg, precision = ctx.options
        if causal:
            q, k, v, k_mod, zb = ctx.saved_tensors
        else:
            q, k, v, k_mod, state, z = ctx.saved_tensors
        need_dq, need_dk, need_dv, need_dmod = ctx.needs_input_grad[:4]
        need_dmod = bool(need_dmod) and k_mod is not None
        grads = [None] * 7
        if not (need_dq or need_dk or need_dv or need_dmod):
            return tuple(grads)
        B, N, H, Dk = q.shape
        Dv = v.shape[3]
        BH = B * H
        dev = q.device
        has_mod = k_mod is not None
        mod = k_mod if has_mod else k
        dk = torch.empty_like(k, memory_format=torch.contiguous_format) if need_dk else None
        dv = torch.empty_like(v, memory_format=torch.contiguous_format) if need_dv else None
        dmod = torch.empty(k.shape, dtype=k_mod.dtype, device=dev) if need_dmod else None
        key_side = need_dk or need_dv or need_dmod
        if causal:
            n_chunks = zb.shape[1] - 1
            block_v = cfg.block_v_full
            # dq (fp32) is needed by the key side too (the z-term), so it is always formed.
            dq32 = torch.empty((B, N, H, Dk), dtype=torch.float32, device=dev)
            _c_dq[(BH,)](
                q, k, v, mod, grad_out, zb, dq32,
                N, H, Dk, Dv, n_chunks,
                *k.stride(), *v.stride(), *mod.stride(), *grad_out.stride(), *dq32.stride(),
                HAS_MOD=has_mod, CHUNK=CAUSAL_CHUNK, BLOCK_K=cfg.block_k, BLOCK_V=block_v,
                PRECISION=precision, num_warps=cfg.num_warps,
            )
            if key_side:
                _c_bwd[(BH,)](
                    q, k, v, mod, grad_out, zb, dq32,
                    dk if dk is not None else dq32, dv if dv is not None else dq32, dmod if dmod is not None else dq32,
                    N, H, Dk, Dv, n_chunks,
                    *q.stride(), *k.stride(), *v.stride(), *mod.stride(), *grad_out.stride(), *dq32.stride(),
                    *strides(dk, 4), *strides(dv, 4), *strides(dmod, 4),
                    HAS_MOD=has_mod, NEED_DK=need_dk, NEED_DV=need_dv, NEED_DMOD=need_dmod,
                    CHUNK=CAUSAL_CHUNK, BLOCK_K=cfg.block_k, BLOCK_V=block_v,
                    PRECISION=precision, num_warps=cfg.num_warps,
                )
            if need_dq:
                grads[0] = dq32 if q.dtype == torch.float32 else dq32.to(q.dtype)
        else:
            plan = split_plan(N, cfg.block_t, BH, cfg.v_tiles, max(Dk, Dv), sm_count(dev))
            dq = torch.empty_like(q, memory_format=torch.contiguous_format) if need_dq else None
            ds_part = torch.empty((plan.splits, BH, Dk, Dv), dtype=torch.float32, device=dev)
            _nc_query_bwd[(BH, plan.splits, cfg.v_tiles)](
                q, grad_out, state, dq if dq is not None else state, ds_part,
                N, H, BH, Dk, Dv, plan.blocks_per_split,
                *q.stride(), *grad_out.stride(), *strides(dq, 4),
                NEED_DQ=need_dq, BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
                PRECISION=precision, num_warps=cfg.num_warps,
            )
            grads[0] = dq
            if key_side:
                d_state = sum_splits(ds_part)
                r = (d_state * state).sum(-1)  # [BH, Dk] = Σ_j P_j dP_j per channel
                m_blocks = triton.cdiv(N, cfg.block_t)
                _nc_key_bwd[(BH * m_blocks,)](
                    k, v, mod, z, r, d_state,
                    dk if dk is not None else d_state, dv if dv is not None else d_state,
                    dmod if dmod is not None else d_state,
                    N, H, Dk, Dv, m_blocks,
                    *k.stride(), *v.stride(), *mod.stride(),
                    *strides(dk, 4), *strides(dv, 4), *strides(dmod, 4),
                    HAS_MOD=has_mod, NEED_DK=need_dk, NEED_DV=need_dv, NEED_DMOD=need_dmod,
                    BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
                    PRECISION=precision, num_warps=cfg.num_warps,
                )
        grads[1], grads[2], grads[3] = dk, dv, dmod
        return tuple(grads)


def additive_scan_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_mod: Optional[Tensor],
    *,
    causal: bool,
    lse_init: float,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Triton additive scan; arguments already validated (``k_mod`` expanded to ``k``'s shape or None).

    The output has ``out_dtype`` (default q's; the kernels accumulate in fp32 and cast on the store).
    Differentiable in q, k, v and k_mod. Raises ``ValueError`` for Dk or Dv > 256.
    """
    tile_config(q.shape[3], v.shape[3])  # raises on unsupported head dims
    out_dtype = q.dtype if out_dtype is None else out_dtype
    return _AdditiveScan.apply(q, k, v, k_mod, bool(causal), float(lse_init), out_dtype)


__all__ = [
    "INTERPRETER_SM_COUNT",
    "MAX_HEAD_DIM",
    "MAX_SPLITS",
    "additive_scan_triton",
    "partial_buffer_shapes",
    "sm_count",
    "split_plan",
    "tile_config",
]
