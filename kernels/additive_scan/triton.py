"""Triton forward and backward of LightNet's additive recurrence over ``[B, N, H, D]``.

Equations: see :func:`linvision.kernels.additive_scan.additive_scan`. Notation per head and channel ``c``:
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

import functools
import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_HEAD_DIM = 256  # Dk and Dv limit
MAX_SPLITS = 64  # cap on the number of sequence splits of a reduction kernel
PROGRAMS_PER_SM = 4  # reduction kernels aim at this many programs per SM in total
TOKENS_PER_SPLIT_PER_DIM = 8  # a split covers at least 8·max(Dk, Dv) tokens (partials ≲ 25% of its K/V bytes)
INTERPRETER_SM_COUNT = 4  # pretend SM count under TRITON_INTERPRET (CPU tensors)
NONCAUSAL_BLOCK_T: Optional[int] = None  # override of the token block (tests use 16 to exercise the loops)
CAUSAL_CHUNK = 16  # tokens per causal chunk (tl.dot needs ≥ 16)
_MAX_ACC = 128 * 128  # largest fp32 [Dk, BLOCK_V] accumulator tile per non-causal program


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------------------
# Non-causal kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "blocks_per_split"])
def _nc_state_fwd(
    k_ptr, v_ptr, mod_ptr, s_part, m_part, l_part,
    N, H, BH, Dk, Dv, blocks_per_split,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_mb, s_mn, s_mh, s_md,
    HAS_MOD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online softmax partials over one split of the tokens: max m [Dk], l [Dk], acc [Dk, BLOCK_V] (fp32)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    mod_base = mod_ptr + b * s_mb + h * s_mh
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < Dk
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < Dv

    m_run = tl.full([BLOCK_K], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    num_blocks = tl.cdiv(N, BLOCK_T)
    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, num_blocks)
    for blk in range(first, last):
        offs_t = (blk * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask_t = offs_t < N
        mask_tk = mask_t[:, None] & mask_k[None, :]
        f = tl.load(k_base + offs_t[:, None] * s_kn + offs_k[None, :] * s_kd, mask=mask_tk, other=float("-inf"))
        f = f.to(tl.float32)
        vv = tl.load(
            v_base + offs_t[:, None] * s_vn + offs_v[None, :] * s_vd,
            mask=mask_t[:, None] & mask_v[None, :], other=0.0,
        ).to(tl.float32)
        m_new = tl.maximum(m_run, tl.max(f, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)
        p = tl.exp(f - m_safe[None, :])
        l_run = l_run * alpha + tl.sum(p, 0)
        if HAS_MOD:
            p = p * tl.load(
                mod_base + offs_t[:, None] * s_mn + offs_k[None, :] * s_md, mask=mask_tk, other=0.0
            ).to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(tl.trans(p), vv, acc, input_precision=PRECISION)
        m_run = m_new

    part = pid_s.to(tl.int64) * BH + pid_bh
    tl.store(
        s_part + part * Dk * Dv + offs_k[:, None] * Dv + offs_v[None, :], acc,
        mask=mask_k[:, None] & mask_v[None, :],
    )
    if pid_v == 0:
        tl.store(m_part + part * Dk + offs_k, m_run, mask=mask_k)
        tl.store(l_part + part * Dk + offs_k, l_run, mask=mask_k)


@triton.jit(do_not_specialize=["N", "num_blocks"])
def _nc_out_fwd(
    q_ptr, s_ptr, o_ptr,
    N, H, Dk, Dv, num_blocks,
    s_qb, s_qn, s_qh, s_qd,
    s_ob, s_on, s_oh, s_od,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    """o = q S for one block of queries, all of Dv."""
    pid = tl.program_id(0).to(tl.int64)
    pid_bh = pid // num_blocks
    blk = pid % num_blocks
    b = pid_bh // H
    h = pid_bh % H
    offs_t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < Dk
    q = tl.load(
        q_ptr + b * s_qb + h * s_qh + offs_t[:, None] * s_qn + offs_k[None, :] * s_qd,
        mask=mask_t[:, None] & mask_k[None, :], other=0.0,
    ).to(tl.float32)
    s_base = s_ptr + pid_bh * Dk * Dv
    o_base = o_ptr + b * s_ob + h * s_oh
    for v0 in range(0, Dv, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < Dv
        st = tl.load(s_base + offs_k[:, None] * Dv + offs_v[None, :], mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        out = tl.dot(q, st, input_precision=PRECISION)
        tl.store(
            o_base + offs_t[:, None] * s_on + offs_v[None, :] * s_od, out.to(o_ptr.dtype.element_ty),
            mask=mask_t[:, None] & mask_v[None, :],
        )


@triton.jit(do_not_specialize=["N", "blocks_per_split"])
def _nc_query_bwd(
    q_ptr, do_ptr, s_ptr, dq_ptr, ds_part,
    N, H, BH, Dk, Dv, blocks_per_split,
    s_qb, s_qn, s_qh, s_qd,
    s_gb, s_gn, s_gh, s_gd,
    s_dqb, s_dqn, s_dqh, s_dqd,
    NEED_DQ: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq = dO Sᵀ per token (first Dv-tile program) and the partial dS = Σ qᵀ dO over one split."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    q_base = q_ptr + b * s_qb + h * s_qh
    do_base = do_ptr + b * s_gb + h * s_gh
    dq_base = dq_ptr + b * s_dqb + h * s_dqh
    s_base = s_ptr + pid_bh * Dk * Dv
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < Dk
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < Dv

    ds_acc = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    num_blocks = tl.cdiv(N, BLOCK_T)
    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, num_blocks)
    for blk in range(first, last):
        offs_t = (blk * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask_t = offs_t < N
        q = tl.load(
            q_base + offs_t[:, None] * s_qn + offs_k[None, :] * s_qd,
            mask=mask_t[:, None] & mask_k[None, :], other=0.0,
        ).to(tl.float32)
        do = tl.load(
            do_base + offs_t[:, None] * s_gn + offs_v[None, :] * s_gd,
            mask=mask_t[:, None] & mask_v[None, :], other=0.0,
        ).to(tl.float32)
        ds_acc = tl.dot(tl.trans(q), do, ds_acc, input_precision=PRECISION)
        if NEED_DQ:
            if pid_v == 0:
                dq = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
                for v0 in range(0, Dv, BLOCK_V):
                    offs_w = v0 + tl.arange(0, BLOCK_V)
                    mask_w = offs_w < Dv
                    do_w = tl.load(
                        do_base + offs_t[:, None] * s_gn + offs_w[None, :] * s_gd,
                        mask=mask_t[:, None] & mask_w[None, :], other=0.0,
                    ).to(tl.float32)
                    s_w = tl.load(
                        s_base + offs_k[:, None] * Dv + offs_w[None, :],
                        mask=mask_k[:, None] & mask_w[None, :], other=0.0,
                    )
                    dq = tl.dot(do_w, tl.trans(s_w), dq, input_precision=PRECISION)
                tl.store(
                    dq_base + offs_t[:, None] * s_dqn + offs_k[None, :] * s_dqd, dq.to(dq_ptr.dtype.element_ty),
                    mask=mask_t[:, None] & mask_k[None, :],
                )

    part = pid_s.to(tl.int64) * BH + pid_bh
    tl.store(
        ds_part + part * Dk * Dv + offs_k[:, None] * Dv + offs_v[None, :], ds_acc,
        mask=mask_k[:, None] & mask_v[None, :],
    )


@triton.jit(do_not_specialize=["N", "num_blocks"])
def _nc_key_bwd(
    k_ptr, v_ptr, mod_ptr, z_ptr, r_ptr, ds_ptr,
    dk_ptr, dv_ptr, dmod_ptr,
    N, H, Dk, Dv, num_blocks,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_mb, s_mn, s_mh, s_md,
    s_gkb, s_gkn, s_gkh, s_gkd,
    s_gvb, s_gvn, s_gvh, s_gvd,
    s_gmb, s_gmn, s_gmh, s_gmd,
    HAS_MOD: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, NEED_DMOD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per key block: P = e^{f−z}, dK̄ = v dSᵀ, dv = K̄ dS, df = P(κ dK̄ − r), dκ = P dK̄."""
    pid = tl.program_id(0).to(tl.int64)
    pid_bh = pid // num_blocks
    blk = pid % num_blocks
    b = pid_bh // H
    h = pid_bh % H
    offs_t = (blk * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    mask_t = offs_t < N
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < Dk
    mask_tk = mask_t[:, None] & mask_k[None, :]

    f = tl.load(
        k_ptr + b * s_kb + h * s_kh + offs_t[:, None] * s_kn + offs_k[None, :] * s_kd, mask=mask_tk, other=0.0
    ).to(tl.float32)
    z = tl.load(z_ptr + pid_bh * Dk + offs_k, mask=mask_k, other=0.0)
    z = tl.where(z == float("-inf"), 0.0, z)
    p = tl.where(mask_tk, tl.exp(f - z[None, :]), 0.0)
    if HAS_MOD:
        mod = tl.load(
            mod_ptr + b * s_mb + h * s_mh + offs_t[:, None] * s_mn + offs_k[None, :] * s_md, mask=mask_tk, other=0.0
        ).to(tl.float32)
        kbar = p * mod
    else:
        kbar = p
    dkbar = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    s_base = ds_ptr + pid_bh * Dk * Dv
    for v0 in range(0, Dv, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < Dv
        mask_tv = mask_t[:, None] & mask_v[None, :]
        ds = tl.load(s_base + offs_k[:, None] * Dv + offs_v[None, :], mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        if NEED_DK or NEED_DMOD:
            vv = tl.load(
                v_ptr + b * s_vb + h * s_vh + offs_t[:, None] * s_vn + offs_v[None, :] * s_vd, mask=mask_tv, other=0.0
            ).to(tl.float32)
            dkbar = tl.dot(vv, tl.trans(ds), dkbar, input_precision=PRECISION)
        if NEED_DV:
            dv = tl.dot(kbar, ds, input_precision=PRECISION)
            tl.store(
                dv_ptr + b * s_gvb + h * s_gvh + offs_t[:, None] * s_gvn + offs_v[None, :] * s_gvd,
                dv.to(dv_ptr.dtype.element_ty), mask=mask_tv,
            )
    if NEED_DK:
        r = tl.load(r_ptr + pid_bh * Dk + offs_k, mask=mask_k, other=0.0)
        if HAS_MOD:
            df = p * (mod * dkbar - r[None, :])
        else:
            df = p * (dkbar - r[None, :])
        tl.store(
            dk_ptr + b * s_gkb + h * s_gkh + offs_t[:, None] * s_gkn + offs_k[None, :] * s_gkd,
            df.to(dk_ptr.dtype.element_ty), mask=mask_tk,
        )
    if NEED_DMOD:
        tl.store(
            dmod_ptr + b * s_gmb + h * s_gmh + offs_t[:, None] * s_gmn + offs_k[None, :] * s_gmd,
            (p * dkbar).to(dmod_ptr.dtype.element_ty), mask=mask_tk,
        )


# ----------------------------------------------------------------------------------------------------------
# Causal kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_lse(f, z_prev, CHUNK: tl.constexpr):
    """Per token t of a chunk: z_t = log(e^{z_prev} + Σ_{s≤t} e^{f_s}) per channel, exactly.

    Returns the masked pair tensor f3[t, s, c] = f_sc (s ≤ t, else −inf) and z [CHUNK, BLOCK_K].
    """
    i = tl.arange(0, CHUNK)
    causal = i[None, :] <= i[:, None]
    f3 = tl.where(causal[:, :, None], f[None, :, :], float("-inf"))
    mx = tl.maximum(tl.max(f3, 1), z_prev[None, :])
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    tot = tl.sum(tl.exp(f3 - mx[:, None, :]), 1) + tl.exp(z_prev[None, :] - mx)  # ≥ 1 unless all −inf
    z = tl.where(tot > 0.0, mx + tl.log(tl.maximum(tot, 1.0)), float("-inf"))
    return f3, z


@triton.jit
def _last_row(z, CHUNK: tl.constexpr):
    """z[CHUNK − 1, :] (the value at the chunk end; padded rows repeat the last valid token's)."""
    i = tl.arange(0, CHUNK)
    return tl.sum(tl.where((i == CHUNK - 1)[:, None], z, 0.0), 0)


@triton.jit(do_not_specialize=["N", "n_chunks"])
def _c_fwd(
    q_ptr, k_ptr, v_ptr, mod_ptr, o_ptr, zb_ptr,
    N, H, Dk, Dv, n_chunks, lse_init,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_mb, s_mn, s_mh, s_md,
    s_ob, s_on, s_oh, s_od,
    HAS_MOD: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    """Causal forward scan over the chunks of one (batch, head) and one Dv tile; stores z at the chunk boundaries."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_base = q_ptr + b * s_qb + h * s_qh
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    mod_base = mod_ptr + b * s_mb + h * s_mh
    o_base = o_ptr + b * s_ob + h * s_oh
    zb_base = zb_ptr + pid_bh * (n_chunks + 1) * Dk
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < Dk
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < Dv

    z_prev = tl.zeros([BLOCK_K], dtype=tl.float32) + lse_init
    state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    for c in range(0, n_chunks):
        if pid_v == 0:
            tl.store(zb_base + c * Dk + offs_k, z_prev, mask=mask_k)
        offs_t = (c * CHUNK + tl.arange(0, CHUNK)).to(tl.int64)
        mask_t = offs_t < N
        mask_tk = mask_t[:, None] & mask_k[None, :]
        mask_tv = mask_t[:, None] & mask_v[None, :]
        q = tl.load(q_base + offs_t[:, None] * s_qn + offs_k[None, :] * s_qd, mask=mask_tk, other=0.0).to(tl.float32)
        f = tl.load(k_base + offs_t[:, None] * s_kn + offs_k[None, :] * s_kd, mask=mask_tk, other=float("-inf"))
        f = f.to(tl.float32)
        vv = tl.load(v_base + offs_t[:, None] * s_vn + offs_v[None, :] * s_vd, mask=mask_tv, other=0.0).to(tl.float32)
        f3, z = _chunk_lse(f, z_prev, CHUNK)
        zs = tl.where(z == float("-inf"), 0.0, z)
        out = tl.dot(q * tl.exp(z_prev[None, :] - zs), state, input_precision=PRECISION)
        w3 = tl.exp(f3 - zs[:, None, :])
        if HAS_MOD:
            mod = tl.load(
                mod_base + offs_t[:, None] * s_mn + offs_k[None, :] * s_md, mask=mask_tk, other=0.0
            ).to(tl.float32)
            w3 = w3 * mod[None, :, :]
        scores = tl.sum(q[:, None, :] * w3, 2)
        out = tl.dot(scores, vv, out, input_precision=PRECISION)
        tl.store(o_base + offs_t[:, None] * s_on + offs_v[None, :] * s_od, out.to(o_ptr.dtype.element_ty), mask=mask_tv)

        z_last = _last_row(z, CHUNK)
        zl = tl.where(z_last == float("-inf"), 0.0, z_last)
        kk = tl.exp(f - zl[None, :])
        if HAS_MOD:
            kk = kk * mod
        state = state * tl.exp(z_prev - zl)[:, None]
        state = tl.dot(tl.trans(kk), vv, state, input_precision=PRECISION)
        z_prev = z_last
    if pid_v == 0:
        tl.store(zb_base + n_chunks * Dk + offs_k, z_prev, mask=mask_k)


@triton.jit(do_not_specialize=["N", "n_chunks"])
def _c_dq(
    q_ptr, k_ptr, v_ptr, mod_ptr, do_ptr, zb_ptr, dq_ptr,
    N, H, Dk, Dv, n_chunks,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_mb, s_mn, s_mh, s_md,
    s_gb, s_gn, s_gh, s_gd,
    s_dqb, s_dqn, s_dqh, s_dqd,
    HAS_MOD: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    """Forward scan again: dq_t = S_t dO_t per channel (fp32), all of Dv in one program."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    mod_base = mod_ptr + b * s_mb + h * s_mh
    do_base = do_ptr + b * s_gb + h * s_gh
    dq_base = dq_ptr + b * s_dqb + h * s_dqh
    zb_base = zb_ptr + pid_bh * (n_chunks + 1) * Dk
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < Dk
    offs_v = tl.arange(0, BLOCK_V)
    mask_v = offs_v < Dv

    state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    for c in range(0, n_chunks):
        z_prev = tl.load(zb_base + c * Dk + offs_k, mask=mask_k, other=float("-inf"))
        z_last = tl.load(zb_base + (c + 1) * Dk + offs_k, mask=mask_k, other=float("-inf"))
        offs_t = (c * CHUNK + tl.arange(0, CHUNK)).to(tl.int64)
        mask_t = offs_t < N
        mask_tk = mask_t[:, None] & mask_k[None, :]
        mask_tv = mask_t[:, None] & mask_v[None, :]
        f = tl.load(k_base + offs_t[:, None] * s_kn + offs_k[None, :] * s_kd, mask=mask_tk, other=float("-inf"))
        f = f.to(tl.float32)
        vv = tl.load(v_base + offs_t[:, None] * s_vn + offs_v[None, :] * s_vd, mask=mask_tv, other=0.0).to(tl.float32)
        do = tl.load(do_base + offs_t[:, None] * s_gn + offs_v[None, :] * s_gd, mask=mask_tv, other=0.0).to(tl.float32)
        f3, z = _chunk_lse(f, z_prev, CHUNK)
        zs = tl.where(z == float("-inf"), 0.0, z)
        dq = tl.dot(do, tl.trans(state), input_precision=PRECISION) * tl.exp(z_prev[None, :] - zs)
        w3 = tl.exp(f3 - zs[:, None, :])
        if HAS_MOD:
            mod = tl.load(
                mod_base + offs_t[:, None] * s_mn + offs_k[None, :] * s_md, mask=mask_tk, other=0.0
            ).to(tl.float32)
            w3 = w3 * mod[None, :, :]
        vdo = tl.dot(do, tl.trans(vv), input_precision=PRECISION)  # [t, s] = dO_t · v_s
        dq += tl.sum(vdo[:, :, None] * w3, 1)
        tl.store(dq_base + offs_t[:, None] * s_dqn + offs_k[None, :] * s_dqd, dq, mask=mask_tk)

        zl = tl.where(z_last == float("-inf"), 0.0, z_last)
        kk = tl.exp(f - zl[None, :])
        if HAS_MOD:
            kk = kk * mod
        state = state * tl.exp(z_prev - zl)[:, None]
        state = tl.dot(tl.trans(kk), vv, state, input_precision=PRECISION)


@triton.jit(do_not_specialize=["N", "n_chunks"])
def _c_bwd(
    q_ptr, k_ptr, v_ptr, mod_ptr, do_ptr, zb_ptr, dq_ptr,
    dk_ptr, dv_ptr, dmod_ptr,
    N, H, Dk, Dv, n_chunks,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_mb, s_mn, s_mh, s_md,
    s_gb, s_gn, s_gh, s_gd,
    s_dqb, s_dqn, s_dqh, s_dqd,
    s_gkb, s_gkn, s_gkh, s_gkd,
    s_gvb, s_gvn, s_gvh, s_gvd,
    s_gmb, s_gmn, s_gmh, s_gmd,
    HAS_MOD: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, NEED_DMOD: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    """Reverse scan: dv, df, dκ per token from the carries dS (Σ later e^{z_ref−z_t} q_tᵀ dO_t) and R (… q_t dq_t)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    q_base = q_ptr + b * s_qb + h * s_qh
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    mod_base = mod_ptr + b * s_mb + h * s_mh
    do_base = do_ptr + b * s_gb + h * s_gh
    dq_base = dq_ptr + b * s_dqb + h * s_dqh
    zb_base = zb_ptr + pid_bh * (n_chunks + 1) * Dk
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < Dk
    offs_v = tl.arange(0, BLOCK_V)
    mask_v = offs_v < Dv

    d_state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    r_carry = tl.zeros([BLOCK_K], dtype=tl.float32)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        z_prev = tl.load(zb_base + c * Dk + offs_k, mask=mask_k, other=float("-inf"))
        z_last = tl.load(zb_base + (c + 1) * Dk + offs_k, mask=mask_k, other=float("-inf"))
        offs_t = (c * CHUNK + tl.arange(0, CHUNK)).to(tl.int64)
        mask_t = offs_t < N
        mask_tk = mask_t[:, None] & mask_k[None, :]
        mask_tv = mask_t[:, None] & mask_v[None, :]
        q = tl.load(q_base + offs_t[:, None] * s_qn + offs_k[None, :] * s_qd, mask=mask_tk, other=0.0).to(tl.float32)
        f = tl.load(k_base + offs_t[:, None] * s_kn + offs_k[None, :] * s_kd, mask=mask_tk, other=float("-inf"))
        f = f.to(tl.float32)
        vv = tl.load(v_base + offs_t[:, None] * s_vn + offs_v[None, :] * s_vd, mask=mask_tv, other=0.0).to(tl.float32)
        do = tl.load(do_base + offs_t[:, None] * s_gn + offs_v[None, :] * s_gd, mask=mask_tv, other=0.0).to(tl.float32)
        dq = tl.load(dq_base + offs_t[:, None] * s_dqn + offs_k[None, :] * s_dqd, mask=mask_tk, other=0.0)
        f3, z = _chunk_lse(f, z_prev, CHUNK)
        zs = tl.where(z == float("-inf"), 0.0, z)
        zl = tl.where(z_last == float("-inf"), 0.0, z_last)

        # later chunks, through the carries (reference z_last)
        pp = tl.exp(f - zl[None, :])  # [s, K]
        if HAS_MOD:
            mod = tl.load(
                mod_base + offs_t[:, None] * s_mn + offs_k[None, :] * s_md, mask=mask_tk, other=0.0
            ).to(tl.float32)
            km = pp * mod
        else:
            km = pp
        dv = tl.dot(km, d_state, input_precision=PRECISION)
        e_acc = pp * tl.dot(vv, tl.trans(d_state), input_precision=PRECISION)
        zt = pp * r_carry[None, :]
        # this chunk, pair by pair: w3[t, s, c] = e^{f_sc − z_tc} for s ≤ t
        w3 = tl.exp(f3 - zs[:, None, :])
        qw = q[:, None, :] * w3
        if HAS_MOD:
            scores = tl.sum(qw * mod[None, :, :], 2)
        else:
            scores = tl.sum(qw, 2)
        dv = tl.dot(tl.trans(scores), do, dv, input_precision=PRECISION)
        vdo = tl.dot(do, tl.trans(vv), input_precision=PRECISION)  # [t, s] = dO_t · v_s
        e_acc += tl.sum(qw * vdo[:, :, None], 0)
        qdq = q * dq
        zt += tl.sum(qdq[:, None, :] * w3, 0)
        if NEED_DV:
            tl.store(
                dv_ptr + b * s_gvb + h * s_gvh + offs_t[:, None] * s_gvn + offs_v[None, :] * s_gvd,
                dv.to(dv_ptr.dtype.element_ty), mask=mask_tv,
            )
        if NEED_DK:
            if HAS_MOD:
                df = mod * e_acc - zt
            else:
                df = e_acc - zt
            tl.store(
                dk_ptr + b * s_gkb + h * s_gkh + offs_t[:, None] * s_gkn + offs_k[None, :] * s_gkd,
                df.to(dk_ptr.dtype.element_ty), mask=mask_tk,
            )
        if NEED_DMOD:
            tl.store(
                dmod_ptr + b * s_gmb + h * s_gmh + offs_t[:, None] * s_gmn + offs_k[None, :] * s_gmd,
                e_acc.to(dmod_ptr.dtype.element_ty), mask=mask_tk,
            )

        # carries to the previous chunk end (reference z_prev)
        g = tl.exp(z_prev[None, :] - zs)  # [t, K]
        decay = tl.exp(z_prev - zl)
        d_state = d_state * decay[:, None]
        d_state = tl.dot(tl.trans(q * g), do, d_state, input_precision=PRECISION)
        r_carry = r_carry * decay + tl.sum(qdq * g, 0)


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


class SplitPlan(NamedTuple):
    """How a reduction kernel splits the sequence: ``splits`` ranges of ``blocks_per_split`` token blocks."""

    blocks: int
    splits: int
    blocks_per_split: int


def tile_config(dk: int, dv: int) -> TileConfig:
    """Fixed block-size heuristics (no autotune). ``tl.dot`` needs every dimension ≥ 16."""
    if dk > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ValueError(f"the Triton backend supports Dk and Dv up to {MAX_HEAD_DIM}, got Dk={dk}, Dv={dv}")
    block_k = max(16, triton.next_power_of_2(dk))
    block_v_full = max(16, triton.next_power_of_2(dv))
    block_v = min(block_v_full, max(16, _MAX_ACC // block_k))
    block_t = NONCAUSAL_BLOCK_T or (64 if max(block_k, block_v) <= 64 else 32)
    num_warps = 4 if block_k * block_v <= 64 * 64 else 8
    return TileConfig(block_t, block_k, block_v, block_v_full, triton.cdiv(dv, block_v), num_warps)


def split_plan(seq_len: int, block_t: int, batch_heads: int, v_tiles: int, head_dim: int, sm_count: int) -> SplitPlan:
    """Number of sequence splits of a non-causal reduction kernel; at most ``MAX_SPLITS`` whatever ``seq_len``.

    ``min(programs wanted / (B·H·tiles), seq_len / (TOKENS_PER_SPLIT_PER_DIM·head_dim), MAX_SPLITS, blocks)``,
    at least one; then re-balanced so that no split is empty.
    """
    blocks = triton.cdiv(seq_len, block_t)
    wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count, max(1, batch_heads * v_tiles))
    by_tokens = seq_len // max(1, TOKENS_PER_SPLIT_PER_DIM * head_dim)
    splits = max(1, min(wanted, by_tokens, MAX_SPLITS, blocks))
    per = max(1, triton.cdiv(blocks, splits))
    return SplitPlan(blocks, max(1, triton.cdiv(blocks, per)), per)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; ``INTERPRETER_SM_COUNT`` for CPU tensors (interpreter)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SM_COUNT


def partial_buffer_shapes(seq_len: int, batch: int, heads: int, dk: int, dv: int, sms: int) -> Tuple[Tuple[int, ...], ...]:
    """Shapes of the non-causal fp32 partial buffers (forward and backward): ``S``/``dS`` ``[splits, B·H, Dk, Dv]``
    and ``m``, ``l`` ``[splits, B·H, Dk]``. Bounded by ``MAX_SPLITS`` for any ``seq_len``."""
    cfg = tile_config(dk, dv)
    plan = split_plan(seq_len, cfg.block_t, batch * heads, cfg.v_tiles, max(dk, dv), sms)
    bh = batch * heads
    return (plan.splits, bh, dk, dv), (plan.splits, bh, dk)


def _strides(t: Optional[Tensor], n: int) -> Tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


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
    def forward(ctx, q, k, v, k_mod, causal, lse_init):
        B, N, H, Dk = q.shape
        Dv = v.shape[3]
        cfg = tile_config(Dk, Dv)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        BH = B * H
        dev = q.device
        has_mod = k_mod is not None
        mod = k_mod if has_mod else k
        out = torch.empty((B, N, H, Dv), dtype=q.dtype, device=dev)
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
        grads = [None] * 6
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
                    *_strides(dk, 4), *_strides(dv, 4), *_strides(dmod, 4),
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
                *q.stride(), *grad_out.stride(), *_strides(dq, 4),
                NEED_DQ=need_dq, BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
                PRECISION=precision, num_warps=cfg.num_warps,
            )
            grads[0] = dq
            if key_side:
                d_state = ds_part[0] if plan.splits == 1 else ds_part.sum(0)
                r = (d_state * state).sum(-1)  # [BH, Dk] = Σ_j P_j dP_j per channel
                m_blocks = triton.cdiv(N, cfg.block_t)
                _nc_key_bwd[(BH * m_blocks,)](
                    k, v, mod, z, r, d_state,
                    dk if dk is not None else d_state, dv if dv is not None else d_state,
                    dmod if dmod is not None else d_state,
                    N, H, Dk, Dv, m_blocks,
                    *k.stride(), *v.stride(), *mod.stride(),
                    *_strides(dk, 4), *_strides(dv, 4), *_strides(dmod, 4),
                    HAS_MOD=has_mod, NEED_DK=need_dk, NEED_DV=need_dv, NEED_DMOD=need_dmod,
                    BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
                    PRECISION=precision, num_warps=cfg.num_warps,
                )
        grads[1], grads[2], grads[3] = dk, dv, dmod
        return tuple(grads)


def additive_scan_triton(
    q: Tensor, k: Tensor, v: Tensor, k_mod: Optional[Tensor], *, causal: bool, lse_init: float
) -> Tensor:
    """Triton additive scan; arguments already validated (``k_mod`` expanded to ``k``'s shape or None).

    Differentiable in q, k, v and k_mod. Raises ``ValueError`` for Dk or Dv > 256.
    """
    tile_config(q.shape[3], v.shape[3])  # raises on unsupported head dims
    return _AdditiveScan.apply(q, k, v, k_mod, bool(causal), float(lse_init))


__all__ = [
    "MAX_HEAD_DIM",
    "additive_scan_triton",
    "partial_buffer_shapes",
    "sm_count",
    "split_plan",
    "tile_config",
]
