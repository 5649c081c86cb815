"""Triton forward and backward of circular-window attention (CLEAR) over ``[B, N, H, D]``.

Operator: see :func:`linvision.kernels.window_attention.window_attention`. ``N = T + h·w`` tokens, prefix
first; pooled keys/values ``[B, P, H, D]``. ``r²`` integer test ``dy² + dx² < r²``.

Kernel plan
-----------
Flash-attention style: online softmax in fp32 (base-2 exponent, ``qk_scale = scale·log2 e``), the output
normalised once at the end, the row log-sum-exp ``lse`` (fp32, ``[B·H, N]``) kept for the backward.

Forward, two launches:

1. ``_wa_queries`` (``BWD=False``) on image queries, grid ``(query tiles, B·H)``. A query tile is a 2-D
   patch of ``QH×QW`` image tokens (gathered through their raster indices). It visits, in this order,
   all prefix keys (blocks of ``BLOCK_N``), the image-key patches of ``KH×KW`` tokens that can meet the
   disc of some query of the patch (row tiles × per-row column reach, see ``tiles.py``; about
   ``(QH + 2r)(QW + 2r) / (KH·KW)`` patches, independent of the image size), and all pooled keys.
   Each key patch is masked per (query, key) pair by the exact disc test and the image bounds.
2. ``_wa_dense_queries`` (``BWD=False``) on prefix queries, grid ``(⌈T/BLOCK_M⌉, B·H)``: dense over the
   ``T + h·w`` prefix and image keys, no pooled keys.

Backward (FA2 scheme), ``δ_i = dO_i·O_i`` first (``_wa_delta``, fp32 ``[B·H, N]``), then
``p = exp2(qk_scale·q·k − lse)``, ``ds = p (dO·v − δ)``:

3. ``_wa_queries`` / ``_wa_dense_queries`` with ``BWD=True``: the same visiting order, accumulating
   ``dq = scale·Σ ds k`` per query tile.
4. ``_wa_image_keys``, grid ``(key tiles, B·H)``: a 2-D key patch gathers ``dk = scale·Σ dsᵀ q`` and
   ``dv = Σ pᵀ dO`` from all prefix queries (dense) and from the image-query patches around it (the
   disc relation is symmetric, so the same row/column-reach geometry applies with the roles swapped).
5. ``_wa_dense_keys``, grid ``(⌈K/BLOCK_N⌉, B·H)``: key blocks seen by a contiguous range of queries
   without a mask: prefix keys (all ``N`` queries) and pooled keys (the ``h·w`` image queries).

Every output element is written by exactly one program (no atomics; deterministic).

Numerics and ``tl.dot``
-----------------------
fp32 inputs: fp32 operands, ``input_precision="ieee"``. fp16 (and bf16 on a GPU): native-dtype operands
with fp32 accumulation, ``p`` and ``ds`` rounded to the input dtype before their products (as in
FlashAttention-2). bf16 under ``TRITON_INTERPRET`` (whose bf16 ``tl.dot`` is wrong): fp32 operands.
Softmax statistics, accumulators, ``lse`` and ``δ`` are fp32. Limits: ``Dk, Dv ≤ 256``.
Inputs are read through their strides; token offsets are int64.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tiles import Tile, default_tiles, reach_table

MAX_HEAD_DIM = 256
LOG2E = math.log2(math.e)
NEG_INIT = tl.constexpr(-1.0e30)  # running max before any key: finite, so fully masked blocks give exp2(-inf) = 0, never NaN


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base, tok, ok, s_n, offs_d, d_ok, s_d, DOT_F32: tl.constexpr):
    """Rows ``tok`` (int64, masked by ``ok``) of one (batch, head) slice; fp32 when ``DOT_F32``."""
    t = tl.load(base + tok[:, None] * s_n + offs_d[None, :] * s_d, mask=ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _query_step(q, kt, vt, allowed, qk_scale, m_i, l_i, acc, do, lse, delta,
                BWD: tl.constexpr, PRECISION: tl.constexpr):
    """One key block for a block of queries: online softmax (forward) or the dq update (backward)."""
    s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * qk_scale
    s = tl.where(allowed, s, float("-inf"))
    if BWD:
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        acc = tl.dot(ds.to(kt.dtype), kt, acc, input_precision=PRECISION)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _key_step(kt, vt, qt, dot, lse, delta, allowed, qk_scale, dk, dv, PRECISION: tl.constexpr):
    """One query block for a block of keys (transposed scores ``[keys, queries]``): dk and dv updates."""
    st = tl.dot(kt, tl.trans(qt), input_precision=PRECISION) * qk_scale
    st = tl.where(allowed, st, float("-inf"))
    pt = tl.exp2(st - lse[None, :])
    dv = tl.dot(pt.to(dot.dtype), dot, dv, input_precision=PRECISION)
    dpt = tl.dot(vt, tl.trans(dot), input_precision=PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(qt.dtype), qt, dk, input_precision=PRECISION)
    return dk, dv


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T", "h", "w", "P", "N", "r", "n_row_tiles"])
def _wa_queries(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, o_ptr, lse_ptr, do_ptr, delta_ptr, reach_ptr, cnt_ptr,
    T, h, w, P, N, H, r, n_row_tiles, Dk, Dv, qk_scale, out_scale,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_pkb, s_pkn, s_pkh, s_pkd,
    s_pvb, s_pvn, s_pvh, s_pvd,
    s_ob, s_on, s_oh, s_od,
    s_gb, s_gn, s_gh, s_gd,
    QH: tl.constexpr, QW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BWD: tl.constexpr, COUNT: tl.constexpr,
):
    """One QH×QW patch of image queries: o and lse (forward) or dq (backward, ``o_ptr`` = dq)."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hh = pid_bh % H
    n_tx = tl.cdiv(w, QW)
    y0 = (pid_t // n_tx) * QH
    x0 = (pid_t % n_tx) * QW
    offs_q = tl.arange(0, QH * QW)
    qy = y0 + offs_q // QW
    qx = x0 + offs_q % QW
    q_ok = (qy < h) & (qx < w)
    q_tok = (T + qy * w + qx).to(tl.int64)
    offs_dk = tl.arange(0, BLOCK_DK)
    dk_ok = offs_dk < Dk
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < Dv
    k_base = k_ptr + b * s_kb + hh * s_kh
    v_base = v_ptr + b * s_vb + hh * s_vh

    q = _load_rows(q_ptr + b * s_qb + hh * s_qh, q_tok, q_ok, s_qn, offs_dk, dk_ok, s_qd, DOT_F32)
    m_i = tl.full([QH * QW], NEG_INIT, tl.float32)
    l_i = tl.zeros([QH * QW], tl.float32)
    if BWD:
        acc = tl.zeros([QH * QW, BLOCK_DK], tl.float32)
        do = _load_rows(do_ptr + b * s_gb + hh * s_gh, q_tok, q_ok, s_gn, offs_dv, dv_ok, s_gd, DOT_F32)
        lse = tl.load(lse_ptr + pid_bh * N + q_tok, mask=q_ok, other=0.0)
        delta = tl.load(delta_ptr + pid_bh * N + q_tok, mask=q_ok, other=0.0)
    else:
        acc = tl.zeros([QH * QW, BLOCK_DV], tl.float32)
        do = q
        lse = l_i
        delta = l_i

    # 1. prefix keys: all of them
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(0, T, BLOCK_N):
        tok = (start + offs_n).to(tl.int64)
        ok = tok < T
        kt = _load_rows(k_base, tok, ok, s_kn, offs_dk, dk_ok, s_kd, DOT_F32)
        vt = _load_rows(v_base, tok, ok, s_vn, offs_dv, dv_ok, s_vd, DOT_F32)
        m_i, l_i, acc = _query_step(q, kt, vt, ok[None, :], qk_scale, m_i, l_i, acc, do, lse, delta, BWD, PRECISION)

    # 2. image keys: KH×KW patches around the query patch, masked by the disc
    offs_k = tl.arange(0, KH * KW)
    rk = offs_k // KW
    ck = offs_k % KW
    r2 = r * r
    base_y = y0 - (r - 1)
    i_lo = tl.maximum(r - 1 - y0, 0) // KH
    i_hi = tl.minimum(n_row_tiles, (h - 1 - base_y) // KH + 1)
    cnt = 0
    for i in range(i_lo, i_hi):
        reach = tl.load(reach_ptr + i)
        ky = base_y + i * KH + rk
        base_x = x0 - reach
        j_lo = tl.maximum(reach - x0, 0) // KW
        j_hi = tl.minimum((QW + 2 * reach + KW - 1) // KW, (w - 1 - base_x) // KW + 1)
        for j in range(j_lo, j_hi):
            kx = base_x + j * KW + ck
            k_ok = (ky >= 0) & (ky < h) & (kx >= 0) & (kx < w)
            tok = (T + ky * w + kx).to(tl.int64)
            kt = _load_rows(k_base, tok, k_ok, s_kn, offs_dk, dk_ok, s_kd, DOT_F32)
            vt = _load_rows(v_base, tok, k_ok, s_vn, offs_dv, dv_ok, s_vd, DOT_F32)
            dy = qy[:, None] - ky[None, :]
            dx = qx[:, None] - kx[None, :]
            allowed = k_ok[None, :] & (dy * dy + dx * dx < r2)
            m_i, l_i, acc = _query_step(q, kt, vt, allowed, qk_scale, m_i, l_i, acc, do, lse, delta, BWD, PRECISION)
            cnt += 1

    # 3. pooled keys: all of them
    pk_base = pk_ptr + b * s_pkb + hh * s_pkh
    pv_base = pv_ptr + b * s_pvb + hh * s_pvh
    for start in range(0, P, BLOCK_N):
        tok = (start + offs_n).to(tl.int64)
        ok = tok < P
        kt = _load_rows(pk_base, tok, ok, s_pkn, offs_dk, dk_ok, s_pkd, DOT_F32)
        vt = _load_rows(pv_base, tok, ok, s_pvn, offs_dv, dv_ok, s_pvd, DOT_F32)
        m_i, l_i, acc = _query_step(q, kt, vt, ok[None, :], qk_scale, m_i, l_i, acc, do, lse, delta, BWD, PRECISION)

    o_base = o_ptr + b * s_ob + hh * s_oh
    if BWD:
        tl.store(
            o_base + q_tok[:, None] * s_on + offs_dk[None, :] * s_od, (acc * out_scale).to(o_ptr.dtype.element_ty),
            mask=q_ok[:, None] & dk_ok[None, :],
        )
    else:
        l_i = tl.where(q_ok, l_i, 1.0)  # padding rows of a partial tile may have seen no key
        out = acc / l_i[:, None]
        tl.store(
            o_base + q_tok[:, None] * s_on + offs_dv[None, :] * s_od, out.to(o_ptr.dtype.element_ty),
            mask=q_ok[:, None] & dv_ok[None, :],
        )
        tl.store(lse_ptr + pid_bh * N + q_tok, m_i + tl.log2(l_i), mask=q_ok)
    if COUNT:
        tl.store(cnt_ptr + pid_bh * tl.num_programs(0) + pid_t, cnt)


@triton.jit(do_not_specialize=["Tq", "Nk", "N"])
def _wa_dense_queries(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, do_ptr, delta_ptr,
    Tq, Nk, N, H, Dk, Dv, qk_scale, out_scale,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_ob, s_on, s_oh, s_od,
    s_gb, s_gn, s_gh, s_gd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BWD: tl.constexpr,
):
    """Queries ``[0, Tq)`` (the prefix) against every key in ``[0, Nk)``: o/lse, or dq (``o_ptr`` = dq)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hh = pid_bh % H
    q_tok = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    q_ok = q_tok < Tq
    offs_dk = tl.arange(0, BLOCK_DK)
    dk_ok = offs_dk < Dk
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < Dv
    k_base = k_ptr + b * s_kb + hh * s_kh
    v_base = v_ptr + b * s_vb + hh * s_vh

    q = _load_rows(q_ptr + b * s_qb + hh * s_qh, q_tok, q_ok, s_qn, offs_dk, dk_ok, s_qd, DOT_F32)
    m_i = tl.full([BLOCK_M], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if BWD:
        acc = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
        do = _load_rows(do_ptr + b * s_gb + hh * s_gh, q_tok, q_ok, s_gn, offs_dv, dv_ok, s_gd, DOT_F32)
        lse = tl.load(lse_ptr + pid_bh * N + q_tok, mask=q_ok, other=0.0)
        delta = tl.load(delta_ptr + pid_bh * N + q_tok, mask=q_ok, other=0.0)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        do = q
        lse = l_i
        delta = l_i
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(0, Nk, BLOCK_N):
        tok = (start + offs_n).to(tl.int64)
        ok = tok < Nk
        kt = _load_rows(k_base, tok, ok, s_kn, offs_dk, dk_ok, s_kd, DOT_F32)
        vt = _load_rows(v_base, tok, ok, s_vn, offs_dv, dv_ok, s_vd, DOT_F32)
        m_i, l_i, acc = _query_step(q, kt, vt, ok[None, :], qk_scale, m_i, l_i, acc, do, lse, delta, BWD, PRECISION)

    o_base = o_ptr + b * s_ob + hh * s_oh
    if BWD:
        tl.store(
            o_base + q_tok[:, None] * s_on + offs_dk[None, :] * s_od, (acc * out_scale).to(o_ptr.dtype.element_ty),
            mask=q_ok[:, None] & dk_ok[None, :],
        )
    else:
        l_i = tl.where(q_ok, l_i, 1.0)  # padding rows of a partial tile may have seen no key
        out = acc / l_i[:, None]
        tl.store(
            o_base + q_tok[:, None] * s_on + offs_dv[None, :] * s_od, out.to(o_ptr.dtype.element_ty),
            mask=q_ok[:, None] & dv_ok[None, :],
        )
        tl.store(lse_ptr + pid_bh * N + q_tok, m_i + tl.log2(l_i), mask=q_ok)


@triton.jit(do_not_specialize=["T", "h", "w", "N", "r", "n_row_tiles"])
def _wa_image_keys(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, reach_ptr,
    T, h, w, N, H, r, n_row_tiles, Dk, Dv, qk_scale, scale,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_gb, s_gn, s_gh, s_gd,
    s_dkb, s_dkn, s_dkh, s_dkd,
    s_dvb, s_dvn, s_dvh, s_dvd,
    QH: tl.constexpr, QW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk, dv of one KH×KW patch of image keys: from every prefix query and the image queries around it."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hh = pid_bh % H
    n_tx = tl.cdiv(w, KW)
    y0 = (pid_t // n_tx) * KH
    x0 = (pid_t % n_tx) * KW
    offs_k = tl.arange(0, KH * KW)
    ky = y0 + offs_k // KW
    kx = x0 + offs_k % KW
    k_ok = (ky < h) & (kx < w)
    k_tok = (T + ky * w + kx).to(tl.int64)
    offs_dk = tl.arange(0, BLOCK_DK)
    dk_ok = offs_dk < Dk
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < Dv
    q_base = q_ptr + b * s_qb + hh * s_qh
    g_base = do_ptr + b * s_gb + hh * s_gh
    stat = pid_bh * N

    kt = _load_rows(k_ptr + b * s_kb + hh * s_kh, k_tok, k_ok, s_kn, offs_dk, dk_ok, s_kd, DOT_F32)
    vt = _load_rows(v_ptr + b * s_vb + hh * s_vh, k_tok, k_ok, s_vn, offs_dv, dv_ok, s_vd, DOT_F32)
    dk = tl.zeros([KH * KW, BLOCK_DK], tl.float32)
    dv = tl.zeros([KH * KW, BLOCK_DV], tl.float32)

    # 1. prefix queries: all of them see every image key
    offs_m = tl.arange(0, BLOCK_M)
    for start in range(0, T, BLOCK_M):
        tok = (start + offs_m).to(tl.int64)
        ok = tok < T
        qt = _load_rows(q_base, tok, ok, s_qn, offs_dk, dk_ok, s_qd, DOT_F32)
        dot = _load_rows(g_base, tok, ok, s_gn, offs_dv, dv_ok, s_gd, DOT_F32)
        lse = tl.load(lse_ptr + stat + tok, mask=ok, other=0.0)
        delta = tl.load(delta_ptr + stat + tok, mask=ok, other=0.0)
        dk, dv = _key_step(kt, vt, qt, dot, lse, delta, k_ok[:, None] & ok[None, :], qk_scale, dk, dv, PRECISION)

    # 2. image queries: QH×QW patches around the key patch, masked by the (symmetric) disc
    offs_q = tl.arange(0, QH * QW)
    rq = offs_q // QW
    cq = offs_q % QW
    r2 = r * r
    base_y = y0 - (r - 1)
    i_lo = tl.maximum(r - 1 - y0, 0) // QH
    i_hi = tl.minimum(n_row_tiles, (h - 1 - base_y) // QH + 1)
    for i in range(i_lo, i_hi):
        reach = tl.load(reach_ptr + i)
        qy = base_y + i * QH + rq
        base_x = x0 - reach
        j_lo = tl.maximum(reach - x0, 0) // QW
        j_hi = tl.minimum((KW + 2 * reach + QW - 1) // QW, (w - 1 - base_x) // QW + 1)
        for j in range(j_lo, j_hi):
            qx = base_x + j * QW + cq
            ok = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
            tok = (T + qy * w + qx).to(tl.int64)
            qt = _load_rows(q_base, tok, ok, s_qn, offs_dk, dk_ok, s_qd, DOT_F32)
            dot = _load_rows(g_base, tok, ok, s_gn, offs_dv, dv_ok, s_gd, DOT_F32)
            lse = tl.load(lse_ptr + stat + tok, mask=ok, other=0.0)
            delta = tl.load(delta_ptr + stat + tok, mask=ok, other=0.0)
            dy = ky[:, None] - qy[None, :]
            dx = kx[:, None] - qx[None, :]
            allowed = k_ok[:, None] & ok[None, :] & (dy * dy + dx * dx < r2)
            dk, dv = _key_step(kt, vt, qt, dot, lse, delta, allowed, qk_scale, dk, dv, PRECISION)

    tl.store(
        dk_ptr + b * s_dkb + hh * s_dkh + k_tok[:, None] * s_dkn + offs_dk[None, :] * s_dkd,
        (dk * scale).to(dk_ptr.dtype.element_ty), mask=k_ok[:, None] & dk_ok[None, :],
    )
    tl.store(
        dv_ptr + b * s_dvb + hh * s_dvh + k_tok[:, None] * s_dvn + offs_dv[None, :] * s_dvd,
        dv.to(dv_ptr.dtype.element_ty), mask=k_ok[:, None] & dv_ok[None, :],
    )


@triton.jit(do_not_specialize=["K", "q_lo", "q_hi", "N"])
def _wa_dense_keys(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    K, q_lo, q_hi, N, H, Dk, Dv, qk_scale, scale,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_gb, s_gn, s_gh, s_gd,
    s_dkb, s_dkn, s_dkh, s_dkd,
    s_dvb, s_dvn, s_dvh, s_dvd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk, dv of keys ``[0, K)`` of a key tensor seen, unmasked, by the queries ``[q_lo, q_hi)``."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hh = pid_bh % H
    k_tok = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k_ok = k_tok < K
    offs_dk = tl.arange(0, BLOCK_DK)
    dk_ok = offs_dk < Dk
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < Dv
    q_base = q_ptr + b * s_qb + hh * s_qh
    g_base = do_ptr + b * s_gb + hh * s_gh
    stat = pid_bh * N

    kt = _load_rows(k_ptr + b * s_kb + hh * s_kh, k_tok, k_ok, s_kn, offs_dk, dk_ok, s_kd, DOT_F32)
    vt = _load_rows(v_ptr + b * s_vb + hh * s_vh, k_tok, k_ok, s_vn, offs_dv, dv_ok, s_vd, DOT_F32)
    dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    for start in range(q_lo, q_hi, BLOCK_M):
        tok = (start + offs_m).to(tl.int64)
        ok = tok < q_hi
        qt = _load_rows(q_base, tok, ok, s_qn, offs_dk, dk_ok, s_qd, DOT_F32)
        dot = _load_rows(g_base, tok, ok, s_gn, offs_dv, dv_ok, s_gd, DOT_F32)
        lse = tl.load(lse_ptr + stat + tok, mask=ok, other=0.0)
        delta = tl.load(delta_ptr + stat + tok, mask=ok, other=0.0)
        dk, dv = _key_step(kt, vt, qt, dot, lse, delta, k_ok[:, None] & ok[None, :], qk_scale, dk, dv, PRECISION)

    tl.store(
        dk_ptr + b * s_dkb + hh * s_dkh + k_tok[:, None] * s_dkn + offs_dk[None, :] * s_dkd,
        (dk * scale).to(dk_ptr.dtype.element_ty), mask=k_ok[:, None] & dk_ok[None, :],
    )
    tl.store(
        dv_ptr + b * s_dvb + hh * s_dvh + k_tok[:, None] * s_dvn + offs_dv[None, :] * s_dvd,
        dv.to(dv_ptr.dtype.element_ty), mask=k_ok[:, None] & dv_ok[None, :],
    )


@triton.jit(do_not_specialize=["N"])
def _wa_delta(
    o_ptr, do_ptr, delta_ptr, N, H, Dv,
    s_ob, s_on, s_oh, s_od,
    s_gb, s_gn, s_gh, s_gd,
    BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """``δ = Σ_d dO·O`` in fp32 for one block of tokens of one (batch, head)."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hh = pid_bh % H
    tok = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    ok = tok < N
    offs_d = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < Dv
    o = _load_rows(o_ptr + b * s_ob + hh * s_oh, tok, ok, s_on, offs_d, d_ok, s_od, True)
    g = _load_rows(do_ptr + b * s_gb + hh * s_gh, tok, ok, s_gn, offs_d, d_ok, s_gd, True)
    tl.store(delta_ptr + pid_bh * N + tok, tl.sum(o * g, 1), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------


class Config:
    """Tile shapes and flags for one call (fixed heuristics, no autotune)."""

    def __init__(self, q: Tensor, dk: int, dv: int, tiles: Optional[Tuple[Tile, Tile]]):
        if dk > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
            raise ValueError(f"the Triton backend supports head dims up to {MAX_HEAD_DIM}, got Dk={dk}, Dv={dv}")
        interp = interpreting() or not q.is_cuda
        (self.qh, self.qw), (self.kh, self.kw) = tiles if tiles is not None else default_tiles(interp)
        for a, b in ((self.qh, self.qw), (self.kh, self.kw)):
            n = a * b
            if n < 16 or n & (n - 1):
                raise ValueError(f"tile {a}x{b}: the product must be a power of two >= 16")
        self.block_dk = max(16, triton.next_power_of_2(dk))
        self.block_dv = max(16, triton.next_power_of_2(dv))
        self.block_m = self.qh * self.qw  # dense query blocks as large as a query patch
        self.block_n = self.kh * self.kw  # dense key blocks as large as a key patch
        self.dot_f32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interp)
        self.precision = "ieee" if self.dot_f32 else "tf32"  # precision only matters for fp32 operands
        big = max(self.block_m, self.block_n) * max(self.block_dk, self.block_dv) > 64 * 128
        self.num_warps = 8 if big else 4

    def consts(self):
        return dict(BLOCK_DK=self.block_dk, BLOCK_DV=self.block_dv, DOT_F32=self.dot_f32,
                    PRECISION=self.precision, num_warps=self.num_warps)


@functools.lru_cache(maxsize=64)
def _reach(outer_h: int, inner_h: int, radius: int, device: str) -> Tensor:
    """Column reach per row tile (``tiles.reach_table``) as int32 on ``device``; depends on r and tiles only."""
    return torch.tensor(reach_table(outer_h, inner_h, radius), dtype=torch.int32, device=device)


def _forward(q, k, v, pk, pv, hw, radius, T, scale, cfg: Config, count: bool = False):
    B, N, H, Dk = q.shape
    Dv = v.shape[3]
    h, w = hw
    P = pk.shape[1] if pk is not None else 0
    pk_, pv_ = (pk, pv) if pk is not None else (k, v)
    BH = B * H
    dev = q.device
    out = torch.empty((B, N, H, Dv), dtype=q.dtype, device=dev)
    lse = torch.empty((BH, N), dtype=torch.float32, device=dev)
    reach = _reach(cfg.qh, cfg.kh, radius, str(dev))
    n_tiles = triton.cdiv(h, cfg.qh) * triton.cdiv(w, cfg.qw)
    counts = torch.empty((BH, n_tiles), dtype=torch.int32, device=dev) if count else lse
    qk_scale = scale * LOG2E
    if BH == 0:
        return out, lse, counts
    _wa_queries[(n_tiles, BH)](
        q, k, v, pk_, pv_, out, lse, q, lse, reach, counts,
        T, h, w, P, N, H, radius, reach.numel(), Dk, Dv, qk_scale, 1.0,
        *q.stride(), *k.stride(), *v.stride(), *pk_.stride(), *pv_.stride(), *out.stride(), *q.stride(),
        QH=cfg.qh, QW=cfg.qw, KH=cfg.kh, KW=cfg.kw, BLOCK_N=cfg.block_n, BWD=False, COUNT=count, **cfg.consts(),
    )
    if T:
        _wa_dense_queries[(triton.cdiv(T, cfg.block_m), BH)](
            q, k, v, out, lse, q, lse,
            T, N, N, H, Dk, Dv, qk_scale, 1.0,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *q.stride(),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BWD=False, **cfg.consts(),
        )
    return out, lse, counts


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, hw, radius, T, scale, cfg):
        out, lse, _ = _forward(q, k, v, pk, pv, hw, radius, T, scale, cfg)
        ctx.save_for_backward(q, k, v, pk, pv, out, lse)
        ctx.options = (hw, radius, T, scale, cfg)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, pk, pv, out, lse = ctx.saved_tensors
        (h, w), radius, T, scale, cfg = ctx.options
        needs = ctx.needs_input_grad
        grads = [None] * 10
        B, N, H, Dk = q.shape
        Dv = v.shape[3]
        BH = B * H
        dev = q.device
        P = pk.shape[1] if pk is not None else 0
        if BH == 0 or not any(needs[:5]):
            return tuple(grads)
        qk_scale = scale * LOG2E
        do = grad_out
        consts = cfg.consts()

        delta = torch.empty((BH, N), dtype=torch.float32, device=dev)
        block_t = 64
        _wa_delta[(triton.cdiv(N, block_t), BH)](
            out, do, delta, N, H, Dv, *out.stride(), *do.stride(),
            BLOCK_T=block_t, BLOCK_DV=cfg.block_dv, num_warps=4,
        )

        if needs[0]:
            dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
            reach = _reach(cfg.qh, cfg.kh, radius, str(dev))
            pk_, pv_ = (pk, pv) if pk is not None else (k, v)
            n_tiles = triton.cdiv(h, cfg.qh) * triton.cdiv(w, cfg.qw)
            _wa_queries[(n_tiles, BH)](
                q, k, v, pk_, pv_, dq, lse, do, delta, reach, lse,
                T, h, w, P, N, H, radius, reach.numel(), Dk, Dv, qk_scale, scale,
                *q.stride(), *k.stride(), *v.stride(), *pk_.stride(), *pv_.stride(), *dq.stride(), *do.stride(),
                QH=cfg.qh, QW=cfg.qw, KH=cfg.kh, KW=cfg.kw, BLOCK_N=cfg.block_n, BWD=True, COUNT=False, **consts,
            )
            if T:
                _wa_dense_queries[(triton.cdiv(T, cfg.block_m), BH)](
                    q, k, v, dq, lse, do, delta,
                    T, N, N, H, Dk, Dv, qk_scale, scale,
                    *q.stride(), *k.stride(), *v.stride(), *dq.stride(), *do.stride(),
                    BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BWD=True, **consts,
                )
            grads[0] = dq

        if needs[1] or needs[2]:
            dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
            dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
            reach = _reach(cfg.kh, cfg.qh, radius, str(dev))
            n_tiles = triton.cdiv(h, cfg.kh) * triton.cdiv(w, cfg.kw)
            _wa_image_keys[(n_tiles, BH)](
                q, k, v, do, lse, delta, dk, dv, reach,
                T, h, w, N, H, radius, reach.numel(), Dk, Dv, qk_scale, scale,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
                QH=cfg.qh, QW=cfg.qw, KH=cfg.kh, KW=cfg.kw, BLOCK_M=cfg.block_m, **consts,
            )
            if T:  # prefix keys: seen by every query
                _dense_keys(q, k, v, do, lse, delta, dk, dv, T, 0, N, qk_scale, scale, cfg)
            grads[1], grads[2] = dk, dv

        if pk is not None and (needs[3] or needs[4]):  # pooled keys: seen by every image query
            dpk = torch.empty(pk.shape, dtype=pk.dtype, device=dev)
            dpv = torch.empty(pv.shape, dtype=pv.dtype, device=dev)
            _dense_keys(q, pk, pv, do, lse, delta, dpk, dpv, P, T, N, qk_scale, scale, cfg)
            grads[3], grads[4] = dpk, dpv
        return tuple(grads)


def _dense_keys(q, k, v, do, lse, delta, dk, dv, K, q_lo, q_hi, qk_scale, scale, cfg):
    B, N, H, Dk = q.shape
    _wa_dense_keys[(triton.cdiv(K, cfg.block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv,
        K, q_lo, q_hi, N, H, Dk, v.shape[3], qk_scale, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **cfg.consts(),
    )


def window_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hw: Tuple[int, int],
    radius: int,
    num_prefix_tokens: int,
    pooled_k: Optional[Tensor],
    pooled_v: Optional[Tensor],
    scale: float,
    tiles: Optional[Tuple[Tile, Tile]] = None,
) -> Tensor:
    """Triton window attention; arguments already validated by the public function.

    ``tiles``: ``((QH, QW), (KH, KW))`` image query/key patch shapes (products powers of two ≥ 16);
    default :func:`tiles.default_tiles`. Differentiable in q, k, v, pooled_k, pooled_v.
    """
    cfg = Config(q, q.shape[3], v.shape[3], tiles)
    return _WindowAttention.apply(q, k, v, pooled_k, pooled_v, tuple(hw), int(radius), int(num_prefix_tokens),
                                  float(scale), cfg)


def visited_tile_counts(
    q: Tensor, k: Tensor, v: Tensor, hw: Tuple[int, int], radius: int, num_prefix_tokens: int = 0,
    tiles: Optional[Tuple[Tile, Tile]] = None,
) -> Tensor:
    """Image-key patches each query patch of the forward kernel actually visited, ``[B·H, query tiles]``.

    Counted inside the kernel (a test hook); :func:`tiles.visited_key_tiles` is the host-side mirror.
    """
    cfg = Config(q, q.shape[3], v.shape[3], tiles)
    with torch.no_grad():
        _, _, counts = _forward(q, k, v, None, None, tuple(hw), int(radius), int(num_prefix_tokens),
                                1.0 / math.sqrt(q.shape[3]), cfg, count=True)
    return counts


__all__ = ["window_attention_triton", "visited_tile_counts", "Config", "MAX_HEAD_DIM"]
