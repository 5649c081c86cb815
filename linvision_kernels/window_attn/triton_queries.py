"""Query-side Triton kernels of window attention (plan in :mod:`.triton`): image-query patches and dense
prefix queries, computing o and lse (forward, ``BWD=False``) or dq (backward, ``BWD=True``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_device import block_range, program_head, store_tile, token_block
from .triton_tiles import _col_tiles, _load_rows, _patch, _row_tiles

NEG_INIT = tl.constexpr(-1.0e30)  # running max before any key: finite, so fully masked blocks give exp2(-inf) = 0, never NaN


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
def _query_start(
    q_base, do_base, lse_ptr, delta_ptr, stat, q_tok, q_ok, s_qn, s_qd, s_gn, s_gd, offs_dk, dk_ok, offs_dv, dv_ok,
    BLOCK_Q: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_F32: tl.constexpr, BWD: tl.constexpr,
):
    """A block of queries and its initial state: ``(q, m, l, acc, dO, lse, δ)`` (the last three for the backward)."""
    q = _load_rows(q_base, q_tok, q_ok, s_qn, offs_dk, dk_ok, s_qd, DOT_F32)
    m_i = tl.full([BLOCK_Q], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    if BWD:
        acc = tl.zeros([BLOCK_Q, BLOCK_DK], tl.float32)
        do = _load_rows(do_base, q_tok, q_ok, s_gn, offs_dv, dv_ok, s_gd, DOT_F32)
        lse = tl.load(lse_ptr + stat + q_tok, mask=q_ok, other=0.0)
        delta = tl.load(delta_ptr + stat + q_tok, mask=q_ok, other=0.0)
    else:
        acc = tl.zeros([BLOCK_Q, BLOCK_DV], tl.float32)
        do = q
        lse = l_i
        delta = l_i
    return q, m_i, l_i, acc, do, lse, delta


@triton.jit
def _query_all_keys(
    q, k_base, v_base, n_keys, s_kn, s_kd, s_vn, s_vd, offs_dk, dk_ok, offs_dv, dv_ok, qk_scale,
    m_i, l_i, acc, do, lse, delta,
    BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, BWD: tl.constexpr, PRECISION: tl.constexpr,
):
    """Every key ``[0, n_keys)`` of one key tensor, unmasked, in blocks of ``BLOCK_N``."""
    offs_n = tl.arange(0, BLOCK_N)  # hoisted: shared with the caller's equal-sized ranges
    for start in range(0, n_keys, BLOCK_N):
        tok = (start + offs_n).to(tl.int64)
        ok = tok < n_keys
        kt = _load_rows(k_base, tok, ok, s_kn, offs_dk, dk_ok, s_kd, DOT_F32)
        vt = _load_rows(v_base, tok, ok, s_vn, offs_dv, dv_ok, s_vd, DOT_F32)
        m_i, l_i, acc = _query_step(q, kt, vt, ok[None, :], qk_scale, m_i, l_i, acc, do, lse, delta, BWD, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _query_finish(
    o_base, lse_ptr, stat, q_tok, q_ok, s_on, s_od, offs_dk, dk_ok, offs_dv, dv_ok, acc, m_i, l_i, out_scale,
    BWD: tl.constexpr,
):
    """Store dq (backward, ``o_base`` = dq) or o and the row log-sum-exp (forward)."""
    if BWD:
        store_tile(o_base, q_tok, q_ok, s_on, offs_dk, dk_ok, s_od, acc * out_scale)
    else:
        l_i = tl.where(q_ok, l_i, 1.0)  # padding rows of a partial tile may have seen no key
        out = acc / l_i[:, None]
        store_tile(o_base, q_tok, q_ok, s_on, offs_dv, dv_ok, s_od, out)
        tl.store(lse_ptr + stat + q_tok, m_i + tl.log2(l_i), mask=q_ok)


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
    pid_bh, b, hh = program_head(1, H)
    y0, x0, qy, qx, q_ok, q_tok = _patch(pid_t, T, h, w, QH, QW)
    offs_dk, dk_ok = block_range(0, Dk, BLOCK_DK)
    offs_dv, dv_ok = block_range(0, Dv, BLOCK_DV)
    k_base = k_ptr + b * s_kb + hh * s_kh
    v_base = v_ptr + b * s_vb + hh * s_vh
    stat = pid_bh * N
    q, m_i, l_i, acc, do, lse, delta = _query_start(
        q_ptr + b * s_qb + hh * s_qh, do_ptr + b * s_gb + hh * s_gh, lse_ptr, delta_ptr, stat, q_tok, q_ok,
        s_qn, s_qd, s_gn, s_gd, offs_dk, dk_ok, offs_dv, dv_ok, QH * QW, BLOCK_DK, BLOCK_DV, DOT_F32, BWD,
    )

    # 1. prefix keys: all of them
    m_i, l_i, acc = _query_all_keys(q, k_base, v_base, T, s_kn, s_kd, s_vn, s_vd, offs_dk, dk_ok, offs_dv, dv_ok,
                                    qk_scale, m_i, l_i, acc, do, lse, delta, BLOCK_N, DOT_F32, BWD, PRECISION)

    # 2. image keys: KH×KW patches around the query patch, masked by the disc
    offs_k = tl.arange(0, KH * KW)
    rk = offs_k // KW
    ck = offs_k % KW
    r2 = r * r
    base_y, i_lo, i_hi = _row_tiles(y0, r, h, n_row_tiles, KH)
    cnt = 0
    for i in range(i_lo, i_hi):
        ky = base_y + i * KH + rk
        base_x, j_lo, j_hi = _col_tiles(reach_ptr, i, x0, w, QW, KW)
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
    m_i, l_i, acc = _query_all_keys(
        q, pk_ptr + b * s_pkb + hh * s_pkh, pv_ptr + b * s_pvb + hh * s_pvh, P, s_pkn, s_pkd, s_pvn, s_pvd,
        offs_dk, dk_ok, offs_dv, dv_ok, qk_scale, m_i, l_i, acc, do, lse, delta, BLOCK_N, DOT_F32, BWD, PRECISION,
    )
    _query_finish(o_ptr + b * s_ob + hh * s_oh, lse_ptr, stat, q_tok, q_ok, s_on, s_od, offs_dk, dk_ok, offs_dv, dv_ok,
                  acc, m_i, l_i, out_scale, BWD)
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
    pid_bh, b, hh = program_head(1, H)
    q_tok, q_ok = token_block(pid_m, Tq, BLOCK_M)
    offs_dk, dk_ok = block_range(0, Dk, BLOCK_DK)
    offs_dv, dv_ok = block_range(0, Dv, BLOCK_DV)
    stat = pid_bh * N
    q, m_i, l_i, acc, do, lse, delta = _query_start(
        q_ptr + b * s_qb + hh * s_qh, do_ptr + b * s_gb + hh * s_gh, lse_ptr, delta_ptr, stat, q_tok, q_ok,
        s_qn, s_qd, s_gn, s_gd, offs_dk, dk_ok, offs_dv, dv_ok, BLOCK_M, BLOCK_DK, BLOCK_DV, DOT_F32, BWD,
    )
    m_i, l_i, acc = _query_all_keys(
        q, k_ptr + b * s_kb + hh * s_kh, v_ptr + b * s_vb + hh * s_vh, Nk, s_kn, s_kd, s_vn, s_vd,
        offs_dk, dk_ok, offs_dv, dv_ok, qk_scale, m_i, l_i, acc, do, lse, delta, BLOCK_N, DOT_F32, BWD, PRECISION,
    )
    _query_finish(o_ptr + b * s_ob + hh * s_oh, lse_ptr, stat, q_tok, q_ok, s_on, s_od, offs_dk, dk_ok, offs_dv, dv_ok,
                  acc, m_i, l_i, out_scale, BWD)
