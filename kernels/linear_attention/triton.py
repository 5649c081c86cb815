"""Triton forward and backward of bidirectional linear attention over ``[B, N, H, D]``.

Equations: see :func:`linvision.kernels.linear_attention.linear_attention`. With ``c = M`` (``mean``) or 1,
``k̃_j = wk_j k_j``, ``ṽ_j = wv_j v_j``, ``qd``/``kd`` the denominator features (``q``/``k`` by default):

- state  ``S = Σ_j k̃_j ṽ_jᵀ / c``  ``[Dk, Dv]``,  ``z = Σ_j wk_j kd_j / c``  ``[Dd]``,  ``v̄ = Σ_j ṽ_j / c``  ``[Dv]``
- output ``div``: ``o_i = q_i S / (qd_i·z + eps)``;  ``sub``: ``o_i = s q_i S + (1 − s qd_i·z) v̄``;  ``none``: ``o_i = s q_i S``.

Kernel plan
-----------
Forward, two launches (plus a deterministic torch ``.sum(0)`` over a bounded partial buffer):

1. ``_la_state_fwd``, grid ``(B·H, n_split, Dv tiles)``. Each program owns a contiguous range of key blocks
   and one ``[Dk, BLOCK_V]`` tile of S (all of Dk; Dv is tiled so that the fp32 accumulator stays
   ≤ 128×128), and accumulates ``k̃ᵀṽ`` (``tl.dot``), ``z`` (first Dv tile only) and ``v̄`` (``sub`` only)
   in fp32. It writes one fp32 partial per split into ``[n_split, B·H, ·]``; ``torch.sum(0)`` reduces it.
   Chosen over ``tl.atomic_add`` because it is deterministic (bit-identical runs) and needs no zero-fill;
   the partial round trip is kept small by the split rule below.
2. ``_la_out_fwd``, grid ``(B·H, chunks, Dv tiles)``: a program loads its S tile (and z, v̄) once, keeps it
   resident and walks a contiguous chunk of query blocks (:func:`chunk_plan`): reads q (and qd) once,
   forms the normaliser ``qd·z`` in fp32 and writes o in the input dtype.

Backward, the same shape. Saved for backward: the inputs and the fp32 state (S, z, v̄), nothing N-sized.

1. ``_la_query_bwd``, grid ``(B·H, n_split, Dv tiles)``: every program accumulates its fp32 partial
   ``dS = Σ_i q_iᵀ g_i`` tile (``g = dO/den`` for ``div``, ``s·dO`` otherwise) over one split of the queries,
   ``sub`` also ``dv̄ = Σ_i (1 − s qd_i·z) dO_i``. The first Dv-tile program also does the row pass: per token
   ``dq = (dO Sᵀ)/den`` (or ``s dO Sᵀ``), ``dqz`` = ∂L/∂(qd·z) (``−(dO·q S)/den²``, using
   ``dO·(q S) = (dO Sᵀ)·q``, for ``div``; ``−s dO·v̄`` for ``sub``), ``dq += dqz z`` or ``dqd = dqz z``, and the
   partial ``dz = Σ_i dqz_i qd_i``. Nothing is saved from the forward for this (no o, no row statistic).
   Partials ``[n_split, B·H, ·]`` are bounded exactly like the forward's, then ``.sum(0)``.
2. ``_la_key_bwd``, grid ``(B·H, chunks)``, dS (and dz, dv̄) resident when Dv is one tile:
   ``dk̃ = dS ṽ / c``, ``dṽ = (dSᵀ k̃ + dv̄) / c``, ``dk = wk dk̃ (+ wk dz / c when kd is k)``, ``dv = wv dṽ``,
   ``dkd = wk dz / c``, ``dwk = k·dk̃ + kd·dz / c``, ``dwv = v·dṽ`` (weight gradients of shape
   ``[B, M, H]``; autograd reduces them to the shape of an expanded weight view).

B·H is the first grid axis (limit 2³¹−1); splits (≤ 64), chunks and Dv tiles are small.

Feature maps (``feature_map`` ``"relu"`` / ``"elu+1"`` and ``feature_offset``) are fused: every kernel
applies ``φ`` in fp32 to q, k, qd, kd as it loads them (padding re-masked to zero), and the backward
multiplies dq, dqd, dk, dkd by ``φ'`` at the raw values (re-read at the store: a cache hit). So no mapped
copy of Q or K is written or saved.

Split over the sequence
-----------------------
When ``B·H`` is small (one FLUX sample: 24 heads on 132 SMs) the reduction kernels split the sequence into
``n_split`` contiguous ranges (:func:`split_plan`): enough programs for ``PROGRAMS_PER_SM`` per SM, at most
``MAX_SPLITS`` = 64, never more than the number of token blocks, and each split covering at least
``TOKENS_PER_SPLIT_PER_DIM · max(Dk, Dv)`` tokens so that the fp32 partial round trip (``2·Dk·Dv·4`` bytes
per split) stays ≲ 25 % of the K/V bytes that split reads. The partial buffers therefore never grow with N
beyond that fixed cap (:func:`partial_buffer_shapes`).

Memory bound
------------
Bidirectional linear attention does ≈ D/2 FLOP per byte (bf16), far below the ridge point: the speed limit
is moving the bytes. The forward reads Q, K, V (and qd, kd, weights when given) once and writes O once,
plus the O(splits·B·H·Dk·Dv) fp32 partials and one state load per program. The backward reads Q, dO, K, V
once each (the row pass re-reads dO slices it has just loaded, cache hits) and writes each gradient once.
With more than one Dv tile (padded Dk·Dv > 128²) q and k are re-read per tile. Inputs are read through their
strides (``qkv.reshape(B, N, 3, H, D).unbind(2)`` views need no copy); offsets are int64.

Numerics and ``tl.dot``
-----------------------
All ``tl.dot`` operands are fp32 (loaded values are upcast; the state is fp32). fp32 inputs use
``input_precision="ieee"`` (exact to fp32 rounding). fp16/bf16 inputs use ``"tf32"``: their values are
exact in tf32 (10-bit mantissa); only fp32 intermediates (S, dS, dO/den, weighted k̃, ṽ, φ(q), φ(k)) are
rounded to tf32 inside the product, at the fp16 output's own rounding level. fp32 operands also sidestep the interpreter's broken
bf16 ``tl.dot``. Normalisers and all accumulations are fp32, so fp16/bf16 at N = 65,536 cannot overflow.

Limits: ``Dk`` and ``Dd`` ≤ 256 (held whole in a program); ``Dv`` any size (tiled by ``BLOCK_V``).
Block sizes are fixed heuristics (no autotune), so the interpreter needs no benchmark driver.
"""
from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_HEAD_DIM = 256  # Dk and Dd limit: both are held whole in one program
MAX_SPLITS = 64  # cap on the number of sequence splits of a reduction kernel
PROGRAMS_PER_SM = 4  # reduction kernels aim at this many programs per SM in total
TOKENS_PER_SPLIT_PER_DIM = 8  # a split covers at least 8·max(Dk, Dv) tokens (partials ≲ 25% of its K/V bytes)
INTERPRETER_SM_COUNT = 4  # pretend SM count under TRITON_INTERPRET (CPU tensors)
_MAX_ACC = 128 * 128  # largest fp32 [Dk, BLOCK_V] accumulator tile per program
_NORM_CODES = {"none": 0, "div": 1, "sub": 2}
_FEATURE_MAP_CODES = {None: 0, "relu": 1, "elu+1": 2}


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _phi(x, FMAP: tl.constexpr, offset):
    """Feature map on fp32 values: ``map(x) + offset`` with map 0 = identity, 1 = ReLU, 2 = ELU + 1."""
    if FMAP == 1:
        x = tl.maximum(x, 0.0)
    elif FMAP == 2:
        x = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    return x + offset


@triton.jit
def _dphi(x, FMAP: tl.constexpr):
    """dφ/dx at the raw fp32 values x (the offset does not matter)."""
    if FMAP == 1:
        d = tl.where(x > 0, 1.0, 0.0)
    elif FMAP == 2:
        d = tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d


@triton.jit(do_not_specialize=["M", "blocks_per_split"])
def _la_state_fwd(
    k_ptr, v_ptr, kd_ptr, wk_ptr, wv_ptr,
    s_part, z_part, vb_part,
    M, H, BH, Dk, Dv, Dd, blocks_per_split, phi_offset,
    s_kb, s_km, s_kh, s_kd,
    s_vb, s_vm, s_vh, s_vd,
    s_db, s_dm, s_dh, s_dd,
    s_wkb, s_wkm, s_wkh,
    s_wvb, s_wvm, s_wvh,
    NORM: tl.constexpr, HAS_DEN: tl.constexpr, HAS_WK: tl.constexpr, HAS_WV: tl.constexpr,
    PHI: tl.constexpr, FMAP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial sums over one split of the keys: S tile [Dk, BLOCK_V], z [Dd], v̄ tile [BLOCK_V] (fp32)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    kd_base = kd_ptr + b * s_db + h * s_dh
    wk_base = wk_ptr + b * s_wkb + h * s_wkh
    wv_base = wv_ptr + b * s_wvb + h * s_wvh

    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < Dk
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < Dv
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dd

    acc = tl.zeros((BLOCK_K, BLOCK_V), dtype=tl.float32)
    z_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    vb_acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    num_blocks = tl.cdiv(M, BLOCK_T)
    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, num_blocks)
    for blk in range(first, last):
        offs_t = (blk * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask_t = offs_t < M
        kk = tl.load(
            k_base + offs_t[:, None] * s_km + offs_k[None, :] * s_kd,
            mask=mask_t[:, None] & mask_k[None, :], other=0.0,
        ).to(tl.float32)
        if PHI:
            kk = tl.where(mask_t[:, None] & mask_k[None, :], _phi(kk, FMAP, phi_offset), 0.0)
        vv = tl.load(
            v_base + offs_t[:, None] * s_vm + offs_v[None, :] * s_vd,
            mask=mask_t[:, None] & mask_v[None, :], other=0.0,
        ).to(tl.float32)
        if HAS_WK:
            wk = tl.load(wk_base + offs_t * s_wkm, mask=mask_t, other=0.0).to(tl.float32)
            kk = kk * wk[:, None]
        if HAS_WV:
            wv = tl.load(wv_base + offs_t * s_wvm, mask=mask_t, other=0.0).to(tl.float32)
            vv = vv * wv[:, None]
        acc = tl.dot(tl.trans(kk), vv, acc, input_precision=PRECISION)
        if NORM != 0:
            if pid_v == 0:
                if HAS_DEN:
                    kd = tl.load(
                        kd_base + offs_t[:, None] * s_dm + offs_d[None, :] * s_dd,
                        mask=mask_t[:, None] & mask_d[None, :], other=0.0,
                    ).to(tl.float32)
                    if PHI:
                        kd = tl.where(mask_t[:, None] & mask_d[None, :], _phi(kd, FMAP, phi_offset), 0.0)
                    if HAS_WK:
                        kd = kd * wk[:, None]
                    z_acc += tl.sum(kd, 0)
                else:
                    z_acc += tl.sum(kk, 0)  # BLOCK_D == BLOCK_K here
        if NORM == 2:
            vb_acc += tl.sum(vv, 0)

    part = pid_s.to(tl.int64) * BH + pid_bh
    tl.store(
        s_part + part * Dk * Dv + offs_k[:, None] * Dv + offs_v[None, :], acc,
        mask=mask_k[:, None] & mask_v[None, :],
    )
    if NORM != 0:
        if pid_v == 0:
            tl.store(z_part + part * Dd + offs_d, z_acc, mask=mask_d)
    if NORM == 2:
        tl.store(vb_part + part * Dv + offs_v, vb_acc, mask=mask_v)


@triton.jit(do_not_specialize=["N", "blocks_per_chunk"])
def _la_out_fwd(
    q_ptr, qd_ptr, s_ptr, z_ptr, vb_ptr, o_ptr,
    N, H, Dk, Dv, Dd, blocks_per_chunk, eps, scale, phi_offset,
    s_qb, s_qn, s_qh, s_qd,
    s_db, s_dn, s_dh, s_dd,
    s_ob, s_on, s_oh, s_od,
    NORM: tl.constexpr, HAS_DEN: tl.constexpr, PHI: tl.constexpr, FMAP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """o[:, tile] for a contiguous chunk of query blocks: f(q S, qd·z, v̄) with an fp32 normaliser.

    The state tile S[:, tile] (and z, v̄) is loaded once per program and kept while the program walks
    its query blocks, so the state is not re-read per block."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    q_base = q_ptr + b * s_qb + h * s_qh
    qd_base = qd_ptr + b * s_db + h * s_dh
    o_base = o_ptr + b * s_ob + h * s_oh
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < Dk
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < Dv
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dd

    st = tl.load(
        s_ptr + pid_bh * Dk * Dv + offs_k[:, None] * Dv + offs_v[None, :],
        mask=mask_k[:, None] & mask_v[None, :], other=0.0,
    )
    if NORM != 0:
        z = tl.load(z_ptr + pid_bh * Dd + offs_d, mask=mask_d, other=0.0)
    if NORM == 2:
        vb = tl.load(vb_ptr + pid_bh * Dv + offs_v, mask=mask_v, other=0.0)

    num_blocks = tl.cdiv(N, BLOCK_T)
    first = pid_c * blocks_per_chunk
    last = tl.minimum(first + blocks_per_chunk, num_blocks)
    for blk in range(first, last):
        offs_t = (blk * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask_t = offs_t < N
        q = tl.load(
            q_base + offs_t[:, None] * s_qn + offs_k[None, :] * s_qd,
            mask=mask_t[:, None] & mask_k[None, :], other=0.0,
        ).to(tl.float32)
        if PHI:
            q = tl.where(mask_k[None, :], _phi(q, FMAP, phi_offset), 0.0)
        num = tl.dot(q, st, input_precision=PRECISION)
        if NORM != 0:
            if HAS_DEN:
                qd = tl.load(
                    qd_base + offs_t[:, None] * s_dn + offs_d[None, :] * s_dd,
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0,
                ).to(tl.float32)
                if PHI:
                    qd = tl.where(mask_d[None, :], _phi(qd, FMAP, phi_offset), 0.0)
            else:
                qd = q
            qz = tl.sum(qd * z[None, :], 1)
        if NORM == 1:
            out = num * (1.0 / (qz + eps))[:, None]
        elif NORM == 2:
            out = scale * num + (1.0 - scale * qz)[:, None] * vb[None, :]
        else:
            out = scale * num
        tl.store(
            o_base + offs_t[:, None] * s_on + offs_v[None, :] * s_od, out.to(o_ptr.dtype.element_ty),
            mask=mask_t[:, None] & mask_v[None, :],
        )


@triton.jit
def _row_tile(dq, t, do_w, s_base, vb_base, offs_k, mask_k, offs_w, mask_w, Dv,
              NORM: tl.constexpr, NEED_DQ: tl.constexpr, PRECISION: tl.constexpr):
    """One Dv tile of the row pass: dq += dO_w S_wᵀ (also needed for div's dO·qS); t += dO_w·v̄_w (sub)."""
    if NEED_DQ or NORM == 1:
        s_w = tl.load(s_base + offs_k[:, None] * Dv + offs_w[None, :], mask=mask_k[:, None] & mask_w[None, :], other=0.0)
        dq = tl.dot(do_w, tl.trans(s_w), dq, input_precision=PRECISION)
    if NORM == 2:
        vb_w = tl.load(vb_base + offs_w, mask=mask_w, other=0.0)
        t += tl.sum(do_w * vb_w[None, :], 1)
    return dq, t


@triton.jit(do_not_specialize=["N", "blocks_per_split"])
def _la_query_bwd(
    q_ptr, qd_ptr, do_ptr, s_ptr, z_ptr, vb_ptr,
    dq_ptr, dqd_ptr, ds_part, dz_part, dvb_part,
    N, H, BH, Dk, Dv, Dd, blocks_per_split, eps, scale, phi_offset,
    s_qb, s_qn, s_qh, s_qd,
    s_db, s_dn, s_dh, s_dd,
    s_gb, s_gn, s_gh, s_gd,
    s_dqb, s_dqn, s_dqh, s_dqd,
    s_ddb, s_ddn, s_ddh, s_ddd,
    NORM: tl.constexpr, HAS_DEN: tl.constexpr, ROW_PASS: tl.constexpr, NEED_DQ: tl.constexpr,
    NEED_DQD: tl.constexpr, ROW_V: tl.constexpr, PHI: tl.constexpr, FMAP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Query side of the backward over one split of the queries: dq, dqd per token; partial dS, dz, dv̄."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    q_base = q_ptr + b * s_qb + h * s_qh
    qd_base = qd_ptr + b * s_db + h * s_dh
    do_base = do_ptr + b * s_gb + h * s_gh
    dq_base = dq_ptr + b * s_dqb + h * s_dqh
    dqd_base = dqd_ptr + b * s_ddb + h * s_ddh
    s_base = s_ptr + pid_bh * Dk * Dv

    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < Dk
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < Dv
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dd
    if NORM != 0:
        z = tl.load(z_ptr + pid_bh * Dd + offs_d, mask=mask_d, other=0.0)

    ds_acc = tl.zeros((BLOCK_K, BLOCK_V), dtype=tl.float32)
    dz_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dvb_acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
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
        if PHI:
            q = tl.where(mask_t[:, None] & mask_k[None, :], _phi(q, FMAP, phi_offset), 0.0)
        do = tl.load(
            do_base + offs_t[:, None] * s_gn + offs_v[None, :] * s_gd,
            mask=mask_t[:, None] & mask_v[None, :], other=0.0,
        ).to(tl.float32)
        if NORM != 0:
            if HAS_DEN:
                qd = tl.load(
                    qd_base + offs_t[:, None] * s_dn + offs_d[None, :] * s_dd,
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0,
                ).to(tl.float32)
                if PHI:
                    qd = tl.where(mask_t[:, None] & mask_d[None, :], _phi(qd, FMAP, phi_offset), 0.0)
            else:
                qd = q
            qz = tl.sum(qd * z[None, :], 1)
        if NORM == 1:
            inv = 1.0 / (qz + eps)
            g = do * inv[:, None]
        else:
            g = do * scale
            if NORM == 2:
                dvb_acc += tl.sum((1.0 - scale * qz)[:, None] * do, 0)
        ds_acc = tl.dot(tl.trans(q), g, ds_acc, input_precision=PRECISION)

        if ROW_PASS:
            # Whole-row quantities (over all of Dv): dq and dqz; done by the first Dv-tile program only.
            if pid_v == 0:
                dq = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)  # dO Sᵀ (unscaled)
                t = tl.zeros((BLOCK_T,), dtype=tl.float32)
                # dO is re-read in ROW_V-wide slices (cache hits) so that only a [Dk, ROW_V] slice of S is live.
                for v0 in range(0, Dv, ROW_V):
                    offs_w = v0 + tl.arange(0, ROW_V)
                    mask_w = offs_w < Dv
                    do_w = tl.load(
                        do_base + offs_t[:, None] * s_gn + offs_w[None, :] * s_gd,
                        mask=mask_t[:, None] & mask_w[None, :], other=0.0,
                    ).to(tl.float32)
                    dq, t = _row_tile(dq, t, do_w, s_base, vb_ptr + pid_bh * Dv, offs_k, mask_k, offs_w, mask_w,
                                      Dv, NORM, NEED_DQ, PRECISION)
                if NORM == 1:
                    dqz = -tl.sum(dq * q, 1) * inv * inv  # dO·(q S) = (dO Sᵀ)·q
                elif NORM == 2:
                    dqz = -scale * t
                if NEED_DQ:
                    if NORM == 1:
                        dq = dq * inv[:, None]
                    else:
                        dq = dq * scale
                    if NORM != 0:
                        if not HAS_DEN:
                            dq += dqz[:, None] * z[None, :]
                    if PHI:
                        if FMAP != 0:  # chain rule through φ at the raw q (re-read: a cache hit)
                            q_raw = tl.load(
                                q_base + offs_t[:, None] * s_qn + offs_k[None, :] * s_qd,
                                mask=mask_t[:, None] & mask_k[None, :], other=0.0,
                            ).to(tl.float32)
                            dq = dq * _dphi(q_raw, FMAP)
                    tl.store(
                        dq_base + offs_t[:, None] * s_dqn + offs_k[None, :] * s_dqd,
                        dq.to(dq_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_k[None, :],
                    )
                if NEED_DQD:
                    dqd = dqz[:, None] * z[None, :]
                    if PHI:
                        if FMAP != 0:
                            qd_raw = tl.load(
                                qd_base + offs_t[:, None] * s_dn + offs_d[None, :] * s_dd,
                                mask=mask_t[:, None] & mask_d[None, :], other=0.0,
                            ).to(tl.float32)
                            dqd = dqd * _dphi(qd_raw, FMAP)
                    tl.store(
                        dqd_base + offs_t[:, None] * s_ddn + offs_d[None, :] * s_ddd,
                        dqd.to(dqd_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :],
                    )
                if NORM != 0:
                    dz_acc += tl.sum(dqz[:, None] * qd, 0)

    part = pid_s.to(tl.int64) * BH + pid_bh
    tl.store(
        ds_part + part * Dk * Dv + offs_k[:, None] * Dv + offs_v[None, :], ds_acc,
        mask=mask_k[:, None] & mask_v[None, :],
    )
    if NORM != 0:
        if pid_v == 0:
            tl.store(dz_part + part * Dd + offs_d, dz_acc, mask=mask_d)
    if NORM == 2:
        tl.store(dvb_part + part * Dv + offs_v, dvb_acc, mask=mask_v)


@triton.jit
def _key_tile(
    dkt, dwv, kw, wv, ds, dvb, v_base, dv_base, offs_t, mask_t, offs_v, mask_v, s_vm, s_vd, s_gvm, s_gvd, dv_ptr,
    NORM: tl.constexpr, HAS_WV: tl.constexpr, NEED_DKT: tl.constexpr, NEED_DV: tl.constexpr,
    NEED_DWV: tl.constexpr, PRECISION: tl.constexpr,
):
    """One Dv tile of the key side: dk̃ += ṽ dSᵀ; dṽ = k̃ dS + dv̄ → dv, and dwv += v·dṽ."""
    mask_tv = mask_t[:, None] & mask_v[None, :]
    vv = tl.load(v_base + offs_t[:, None] * s_vm + offs_v[None, :] * s_vd, mask=mask_tv, other=0.0).to(tl.float32)
    if NEED_DKT:
        if HAS_WV:
            dkt = tl.dot(vv * wv[:, None], tl.trans(ds), dkt, input_precision=PRECISION)
        else:
            dkt = tl.dot(vv, tl.trans(ds), dkt, input_precision=PRECISION)
    if NEED_DV or NEED_DWV:
        dvt = tl.dot(kw, ds, input_precision=PRECISION)
        if NORM == 2:
            dvt += dvb[None, :]
        if NEED_DV:
            if HAS_WV:
                dv = dvt * wv[:, None]
            else:
                dv = dvt
            tl.store(
                dv_base + offs_t[:, None] * s_gvm + offs_v[None, :] * s_gvd, dv.to(dv_ptr.dtype.element_ty),
                mask=mask_tv,
            )
        if NEED_DWV:
            dwv += tl.sum(vv * dvt, 1)
    return dkt, dwv


@triton.jit(do_not_specialize=["M", "blocks_per_chunk"])
def _la_key_bwd(
    k_ptr, v_ptr, kd_ptr, wk_ptr, wv_ptr, ds_ptr, dz_ptr, dvb_ptr,
    dk_ptr, dv_ptr, dkd_ptr, dwk_ptr, dwv_ptr,
    M, H, Dk, Dv, Dd, blocks_per_chunk, phi_offset,
    s_kb, s_km, s_kh, s_kd,
    s_vb, s_vm, s_vh, s_vd,
    s_db, s_dm, s_dh, s_dd,
    s_wkb, s_wkm, s_wkh,
    s_wvb, s_wvm, s_wvh,
    s_gkb, s_gkm, s_gkh, s_gkd,
    s_gvb, s_gvm, s_gvh, s_gvd,
    s_gdb, s_gdm, s_gdh, s_gdd,
    s_gwkb, s_gwkm, s_gwkh,
    s_gwvb, s_gwvm, s_gwvh,
    NORM: tl.constexpr, HAS_DEN: tl.constexpr, HAS_WK: tl.constexpr, HAS_WV: tl.constexpr,
    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, NEED_DKD: tl.constexpr, NEED_DWK: tl.constexpr,
    NEED_DWV: tl.constexpr, NEED_DKT: tl.constexpr, V_TILES: tl.constexpr, PHI: tl.constexpr, FMAP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Key side of the backward for a contiguous chunk of key blocks (dS, dz, dv̄ arrive divided by c).

    With one Dv tile, dS (and dz, dv̄) is loaded once per program and kept across its key blocks."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    k_base = k_ptr + b * s_kb + h * s_kh
    kd_base = kd_ptr + b * s_db + h * s_dh
    wk_base = wk_ptr + b * s_wkb + h * s_wkh
    wv_base = wv_ptr + b * s_wvb + h * s_wvh
    v_base = v_ptr + b * s_vb + h * s_vh
    dk_base = dk_ptr + b * s_gkb + h * s_gkh
    dv_base = dv_ptr + b * s_gvb + h * s_gvh
    dkd_base = dkd_ptr + b * s_gdb + h * s_gdh
    dwk_base = dwk_ptr + b * s_gwkb + h * s_gwkh
    dwv_base = dwv_ptr + b * s_gwvb + h * s_gwvh
    ds_base = ds_ptr + pid_bh * Dk * Dv

    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < Dk
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dd
    offs_v = tl.arange(0, BLOCK_V)
    mask_v = offs_v < Dv
    dvb = tl.zeros((BLOCK_V,), dtype=tl.float32)
    if V_TILES == 1:
        ds = tl.load(ds_base + offs_k[:, None] * Dv + offs_v[None, :], mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        if NORM == 2:
            dvb = tl.load(dvb_ptr + pid_bh * Dv + offs_v, mask=mask_v, other=0.0)
    if NORM != 0:
        dz = tl.load(dz_ptr + pid_bh * Dd + offs_d, mask=mask_d, other=0.0)

    num_blocks = tl.cdiv(M, BLOCK_T)
    first = pid_c * blocks_per_chunk
    last = tl.minimum(first + blocks_per_chunk, num_blocks)
    for blk in range(first, last):
        offs_t = (blk * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask_t = offs_t < M
        mask_tk = mask_t[:, None] & mask_k[None, :]
        mask_td = mask_t[:, None] & mask_d[None, :]
        k_raw = tl.load(k_base + offs_t[:, None] * s_km + offs_k[None, :] * s_kd, mask=mask_tk, other=0.0)
        k = k_raw.to(tl.float32)
        if PHI:
            k = tl.where(mask_tk, _phi(k, FMAP, phi_offset), 0.0)
        if HAS_WK:
            wk = tl.load(wk_base + offs_t * s_wkm, mask=mask_t, other=0.0).to(tl.float32)
            kw = k * wk[:, None]
        else:
            kw = k
        if HAS_WV:
            wv = tl.load(wv_base + offs_t * s_wvm, mask=mask_t, other=0.0).to(tl.float32)
        else:
            wv = tl.zeros((BLOCK_T,), dtype=tl.float32)  # unused
        dkt = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)  # dk̃ = dS ṽ / c
        dwv = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if V_TILES == 1:
            dkt, dwv = _key_tile(
                dkt, dwv, kw, wv, ds, dvb, v_base, dv_base, offs_t, mask_t, offs_v, mask_v, s_vm, s_vd, s_gvm, s_gvd,
                dv_ptr, NORM, HAS_WV, NEED_DKT, NEED_DV, NEED_DWV, PRECISION,
            )
        else:
            for v0 in range(0, Dv, BLOCK_V):
                offs_w = v0 + tl.arange(0, BLOCK_V)
                mask_w = offs_w < Dv
                ds_w = tl.load(
                    ds_base + offs_k[:, None] * Dv + offs_w[None, :], mask=mask_k[:, None] & mask_w[None, :], other=0.0
                )
                if NORM == 2:
                    dvb = tl.load(dvb_ptr + pid_bh * Dv + offs_w, mask=mask_w, other=0.0)
                dkt, dwv = _key_tile(
                    dkt, dwv, kw, wv, ds_w, dvb, v_base, dv_base, offs_t, mask_t, offs_w, mask_w, s_vm, s_vd, s_gvm,
                    s_gvd, dv_ptr, NORM, HAS_WV, NEED_DKT, NEED_DV, NEED_DWV, PRECISION,
                )

        if NEED_DK:
            dk = dkt
            if NORM != 0:
                if not HAS_DEN:
                    dk += dz[None, :]  # BLOCK_D == BLOCK_K here
            if HAS_WK:
                dk = dk * wk[:, None]
            if PHI:
                if FMAP != 0:
                    dk = dk * _dphi(k_raw.to(tl.float32), FMAP)
            tl.store(
                dk_base + offs_t[:, None] * s_gkm + offs_k[None, :] * s_gkd, dk.to(dk_ptr.dtype.element_ty),
                mask=mask_tk,
            )
        if NEED_DKD:
            dkd = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32) + dz[None, :]
            if HAS_WK:
                dkd = dkd * wk[:, None]
            if PHI:
                if FMAP != 0:
                    kd_raw = tl.load(
                        kd_base + offs_t[:, None] * s_dm + offs_d[None, :] * s_dd, mask=mask_td, other=0.0
                    ).to(tl.float32)
                    dkd = dkd * _dphi(kd_raw, FMAP)
            tl.store(
                dkd_base + offs_t[:, None] * s_gdm + offs_d[None, :] * s_gdd, dkd.to(dkd_ptr.dtype.element_ty),
                mask=mask_td,
            )
        if NEED_DWK:
            dwk = tl.sum(k * dkt, 1)
            if NORM != 0:
                if HAS_DEN:
                    kd = tl.load(
                        kd_base + offs_t[:, None] * s_dm + offs_d[None, :] * s_dd, mask=mask_td, other=0.0
                    ).to(tl.float32)
                    if PHI:
                        kd = tl.where(mask_td, _phi(kd, FMAP, phi_offset), 0.0)
                else:
                    kd = k
                dwk += tl.sum(kd * dz[None, :], 1)
            tl.store(dwk_base + offs_t * s_gwkm, dwk.to(dwk_ptr.dtype.element_ty), mask=mask_t)
        if NEED_DWV:
            tl.store(dwv_base + offs_t * s_gwvm, dwv.to(dwv_ptr.dtype.element_ty), mask=mask_t)


# ----------------------------------------------------------------------------------------------------------
# Launch planning
# ----------------------------------------------------------------------------------------------------------


class TileConfig(NamedTuple):
    """Block sizes shared by the four kernels for one (Dk, Dv, Dd)."""

    block_t: int  # tokens per block
    block_k: int  # Dk, whole, padded to a power of two ≥ 16
    block_v: int  # Dv tile
    block_d: int  # Dd, whole, padded to a power of two ≥ 16
    v_tiles: int
    num_warps: int
    block_t_out: int  # tokens per block of the output kernel (lighter: no accumulator tile)
    row_v: int  # Dv slice of the query-side row pass (dq = dO Sᵀ): only a [Dk, row_v] slice of S is live


class SplitPlan(NamedTuple):
    """A sequence cut into ``splits`` contiguous ranges of ``blocks_per_split`` token blocks."""

    blocks: int
    splits: int
    blocks_per_split: int


def tile_config(dk: int, dv: int, dd: int) -> TileConfig:
    """Fixed block-size heuristics (no autotune). ``tl.dot`` needs every dimension ≥ 16.

    Dk and Dd are held whole; Dv is tiled so that a ``[Dk, BLOCK_V]`` fp32 tile (state accumulator or
    resident state) has at most 128×128 elements, i.e. one tile up to D = 128. Token blocks shrink as D
    grows to keep the fp32 tiles in registers (checked with ``ptxas -v`` for sm_90a, bf16 inputs: no
    spilling for D ≤ 128; some spilling at D = 256, which is supported but not tuned).
    """
    if dk > MAX_HEAD_DIM or dd > MAX_HEAD_DIM:
        raise ValueError(f"the Triton backend supports Dk and Dd up to {MAX_HEAD_DIM}, got Dk={dk}, Dd={dd}")
    block_k = max(16, triton.next_power_of_2(dk))
    block_d = max(16, triton.next_power_of_2(dd))
    block_v = min(max(16, triton.next_power_of_2(dv)), max(16, _MAX_ACC // block_k))
    widest = max(block_k, block_v, block_d)
    if widest <= 32:
        block_t, num_warps = 64, 4 if widest <= 16 else 8
    elif widest <= 64:
        block_t, num_warps = 32, 8
    else:
        block_t, num_warps = 16, 8
    row_v = min(block_v, 32 if block_k <= 64 else 16)
    return TileConfig(
        block_t, block_k, block_v, block_d, triton.cdiv(dv, block_v), num_warps, min(2 * block_t, 64), row_v
    )


def _plan(blocks: int, splits: int) -> SplitPlan:
    splits = max(1, min(splits, blocks))
    per = max(1, triton.cdiv(blocks, splits))
    return SplitPlan(blocks, max(1, triton.cdiv(blocks, per)), per)  # re-balanced: no split is empty


def split_plan(seq_len: int, block_t: int, batch_heads: int, v_tiles: int, head_dim: int, sm_count: int) -> SplitPlan:
    """Sequence splits of a reduction kernel (fp32 partials per split); bounded by ``MAX_SPLITS`` for any N.

    ``min(programs wanted / (B·H·tiles), seq_len / (8·head_dim), MAX_SPLITS, token blocks)``, at least one.
    Once ``seq_len`` is large enough the result no longer depends on it.
    """
    wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count, max(1, batch_heads * v_tiles))
    by_tokens = seq_len // (TOKENS_PER_SPLIT_PER_DIM * max(1, head_dim))
    return _plan(triton.cdiv(seq_len, block_t), min(wanted, by_tokens, MAX_SPLITS))


def chunk_plan(seq_len: int, block_t: int, batch_heads: int, v_tiles: int, sm_count: int) -> SplitPlan:
    """Chunks of a per-token kernel (output, key-side backward): each program loads the state once and
    walks a contiguous chunk of blocks; ``PROGRAMS_PER_SM`` programs per SM in total, no partials."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count, max(1, batch_heads * v_tiles))
    return _plan(triton.cdiv(seq_len, block_t), wanted)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; ``INTERPRETER_SM_COUNT`` for CPU tensors (interpreter)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SM_COUNT


def partial_buffer_shapes(
    seq_len: int, batch: int, heads: int, dk: int, dv: int, dd: int, normalize: str, sms: int
) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the fp32 partial buffers of a reduction over ``seq_len`` tokens (keys in the forward,
    queries in the backward): ``S``/``dS`` ``[splits, B·H, Dk, Dv]``, ``z``/``dz`` ``[splits, B·H, Dd]``,
    ``v̄``/``dv̄`` ``[splits, B·H, Dv]`` (the last two only when the normalisation uses them).
    The forward and the backward allocate exactly these."""
    cfg = tile_config(dk, dv, dd)
    plan = split_plan(seq_len, cfg.block_t, batch * heads, cfg.v_tiles, max(dk, dv), sms)
    bh = batch * heads
    shapes = {"state": (plan.splits, bh, dk, dv)}
    if normalize != "none":
        shapes["z"] = (plan.splits, bh, dd)
    if normalize == "sub":
        shapes["v_bar"] = (plan.splits, bh, dv)
    return shapes


def _partials(seq_len, B, H, Dk, Dv, Dd, normalize, device) -> Tuple[Tensor, Tensor, Tensor, int]:
    """Allocate (uninitialised; the kernels write every element) the partial buffers; dummies when unused."""
    shapes = partial_buffer_shapes(seq_len, B, H, Dk, Dv, Dd, normalize, sm_count(device))
    bufs = {name: torch.empty(shape, dtype=torch.float32, device=device) for name, shape in shapes.items()}
    state = bufs["state"]
    blocks_per_split = triton.cdiv(triton.cdiv(seq_len, tile_config(Dk, Dv, Dd).block_t), state.shape[0])
    return state, bufs.get("z", state), bufs.get("v_bar", state), max(1, blocks_per_split)


def _strides(t: Optional[Tensor], n: int) -> Tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def _reduce(part: Tensor, count: int) -> Tensor:
    """Deterministic sum over the split axis, divided by ``c``."""
    out = part[0] if part.shape[0] == 1 else part.sum(0)
    return out.div_(count) if count != 1 else out


def _blocks(cfg: TileConfig) -> dict:
    return dict(BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)


# ----------------------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------------------


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_den, k_den, k_weight, v_weight, normalize, mean, eps, scale, feature_map, offset):
        B, N, H, Dk = q.shape
        M, Dv = k.shape[1], v.shape[3]
        has_den = q_den is not None
        Dd = q_den.shape[3] if has_den else Dk
        norm = _NORM_CODES[normalize]
        count = M if mean else 1
        cfg = tile_config(Dk, Dv, Dd)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        BH = B * H
        dev = q.device
        kd = k_den if has_den else k
        qd = q_den if has_den else q
        phi = dict(PHI=feature_map is not None or offset != 0.0, FMAP=_FEATURE_MAP_CODES[feature_map])

        # 1. State: fp32 partials over a bounded number of key splits, then a deterministic sum.
        s_part, z_part, vb_part, per_split = _partials(M, B, H, Dk, Dv, Dd, normalize, dev)
        if BH > 0:
            _la_state_fwd[(BH, s_part.shape[0], cfg.v_tiles)](
                k, v, kd, k_weight if k_weight is not None else k, v_weight if v_weight is not None else v,
                s_part, z_part, vb_part,
                M, H, BH, Dk, Dv, Dd, per_split, offset,
                *k.stride(), *v.stride(), *kd.stride(), *_strides(k_weight, 3), *_strides(v_weight, 3),
                NORM=norm, HAS_DEN=has_den, HAS_WK=k_weight is not None, HAS_WV=v_weight is not None,
                PRECISION=precision, **phi, **_blocks(cfg),
            )
        state = _reduce(s_part, count)  # [B·H, Dk, Dv]
        z = _reduce(z_part, count) if norm else state  # [B·H, Dd]
        v_bar = _reduce(vb_part, count) if norm == 2 else state  # [B·H, Dv]

        # 2. Output: per query token, the state resident in each program.
        out = torch.empty((B, N, H, Dv), dtype=q.dtype, device=dev)
        chunks = chunk_plan(N, cfg.block_t_out, BH, cfg.v_tiles, sm_count(dev))
        if BH > 0 and N > 0:
            _la_out_fwd[(BH, chunks.splits, cfg.v_tiles)](
                q, qd, state, z, v_bar, out,
                N, H, Dk, Dv, Dd, chunks.blocks_per_split, float(eps), float(scale), offset,
                *q.stride(), *qd.stride(), *out.stride(),
                NORM=norm, HAS_DEN=has_den, PRECISION=precision, **phi, **dict(_blocks(cfg), BLOCK_T=cfg.block_t_out),
            )
        ctx.save_for_backward(q, k, v, q_den, k_den, k_weight, v_weight, state, z, v_bar)
        ctx.options = (normalize, count, float(eps), float(scale), cfg, precision, phi, offset)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, q_den, k_den, k_weight, v_weight, state, z, v_bar = ctx.saved_tensors
        normalize, count, eps, scale, cfg, precision, phi, offset = ctx.options
        norm = _NORM_CODES[normalize]
        needs = ctx.needs_input_grad
        has_den = q_den is not None
        B, N, H, Dk = q.shape
        M, Dv = k.shape[1], v.shape[3]
        Dd = q_den.shape[3] if has_den else Dk
        BH = B * H
        dev = q.device

        need_dq = needs[0]
        need_dqd = needs[3] and has_den and norm != 0
        need_dk, need_dv = needs[1], needs[2]
        need_dkd = needs[4] and has_den and norm != 0
        need_dwk = needs[5] and k_weight is not None
        need_dwv = needs[6] and v_weight is not None
        key_side = need_dk or need_dv or need_dkd or need_dwk or need_dwv
        grads = [None] * 13
        if not (need_dq or need_dqd or key_side) or BH == 0:
            return tuple(grads)

        def new_like(t: Tensor) -> Tensor:
            return torch.empty(t.shape, dtype=t.dtype, device=dev)

        # 1. Query side: dq, dqd per token; fp32 partial dS, dz, dv̄ over a bounded number of query splits.
        qd = q_den if has_den else q
        dq = new_like(q) if need_dq else None
        dqd = new_like(q_den) if need_dqd else None
        ds_part, dz_part, dvb_part, per_split = _partials(N, B, H, Dk, Dv, Dd, normalize, dev)
        _la_query_bwd[(BH, ds_part.shape[0], cfg.v_tiles)](
            q, qd, grad_out, state, z, v_bar,
            dq if dq is not None else state, dqd if dqd is not None else state, ds_part, dz_part, dvb_part,
            N, H, BH, Dk, Dv, Dd, per_split, eps, scale, offset,
            *q.stride(), *qd.stride(), *grad_out.stride(), *_strides(dq, 4), *_strides(dqd, 4),
            NORM=norm, HAS_DEN=has_den, ROW_PASS=need_dq or need_dqd or norm != 0,
            NEED_DQ=need_dq, NEED_DQD=need_dqd, ROW_V=cfg.row_v, PRECISION=precision, **phi, **_blocks(cfg),
        )
        grads[0], grads[3] = dq, dqd

        # 2. Key side: dk, dv, dkd, dwk, dwv per token from dS/c, dz/c, dv̄/c.
        if key_side:
            d_state = _reduce(ds_part, count)
            d_z = _reduce(dz_part, count) if norm else d_state
            d_vb = _reduce(dvb_part, count) if norm == 2 else d_state
            kd = k_den if has_den else k
            dk = new_like(k) if need_dk else None
            dv = new_like(v) if need_dv else None
            dkd = new_like(k_den) if need_dkd else None
            dwk = torch.empty((B, M, H), dtype=k_weight.dtype, device=dev) if need_dwk else None
            dwv = torch.empty((B, M, H), dtype=v_weight.dtype, device=dev) if need_dwv else None
            chunks = chunk_plan(M, cfg.block_t, BH, 1, sm_count(dev))
            _la_key_bwd[(BH, chunks.splits)](
                k, v, kd, k_weight if k_weight is not None else k, v_weight if v_weight is not None else v,
                d_state, d_z, d_vb,
                dk if dk is not None else d_state, dv if dv is not None else d_state,
                dkd if dkd is not None else d_state, dwk if dwk is not None else d_state,
                dwv if dwv is not None else d_state,
                M, H, Dk, Dv, Dd, chunks.blocks_per_split, offset,
                *k.stride(), *v.stride(), *kd.stride(), *_strides(k_weight, 3), *_strides(v_weight, 3),
                *_strides(dk, 4), *_strides(dv, 4), *_strides(dkd, 4), *_strides(dwk, 3), *_strides(dwv, 3),
                NORM=norm, HAS_DEN=has_den, HAS_WK=k_weight is not None, HAS_WV=v_weight is not None,
                NEED_DK=need_dk, NEED_DV=need_dv, NEED_DKD=need_dkd, NEED_DWK=need_dwk, NEED_DWV=need_dwv,
                NEED_DKT=need_dk or need_dwk, V_TILES=cfg.v_tiles, PRECISION=precision, **phi, **_blocks(cfg),
            )
            grads[1], grads[2], grads[4], grads[5], grads[6] = dk, dv, dkd, dwk, dwv
        return tuple(grads)


def linear_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_den: Optional[Tensor],
    k_den: Optional[Tensor],
    k_weight: Optional[Tensor],
    v_weight: Optional[Tensor],
    *,
    normalize: str,
    mean: bool,
    eps: float,
    scale: float,
    feature_map: Optional[str] = None,
    feature_offset: float = 0.0,
) -> Tensor:
    """Triton linear attention; arguments already validated by the public function (weights ``[B, M, H]``).

    ``q, k, q_den, k_den`` are raw: the kernels apply ``φ = feature_map + feature_offset`` in fp32 as they
    load them (``None`` and 0: taken as already mapped), and chain gradients through φ at the raw values.
    Differentiable in q, k, v, q_den, k_den, k_weight and v_weight. Raises ``ValueError`` for Dk or Dd > 256.
    """
    if feature_map not in _FEATURE_MAP_CODES:
        raise ValueError(f"unknown feature_map {feature_map!r}; expected one of {tuple(_FEATURE_MAP_CODES)}")
    Dk = q.shape[3]
    Dd = q_den.shape[3] if q_den is not None else Dk
    tile_config(Dk, v.shape[3], Dd)  # raises on unsupported head dims
    if normalize == "none":  # the denominator features play no part
        q_den = k_den = None
    return _LinearAttention.apply(
        q, k, v, q_den, k_den, k_weight, v_weight, normalize, bool(mean), float(eps), float(scale), feature_map,
        float(feature_offset),
    )


__all__ = [
    "linear_attention_triton", "tile_config", "split_plan", "chunk_plan", "partial_buffer_shapes", "sm_count",
    "MAX_HEAD_DIM", "MAX_SPLITS",
]
