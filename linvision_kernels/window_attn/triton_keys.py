"""Key-side Triton kernels of the window-attention backward (plan in :mod:`.triton`): dk and dv of image-key
patches and of dense key blocks (prefix and pooled keys), and the row statistic ``δ = dO·O``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_device import block_range, program_head, store_tile, token_block
from .triton_tiles import _col_tiles, _load_rows, _patch, _row_tiles


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


@triton.jit
def _key_start(k_base, v_base, k_tok, k_ok, s_kn, s_kd, s_vn, s_vd, offs_dk, dk_ok, offs_dv, dv_ok,
               BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_F32: tl.constexpr):
    """A block of keys and values, and its zeroed fp32 dk, dv accumulators."""
    kt = _load_rows(k_base, k_tok, k_ok, s_kn, offs_dk, dk_ok, s_kd, DOT_F32)
    vt = _load_rows(v_base, k_tok, k_ok, s_vn, offs_dv, dv_ok, s_vd, DOT_F32)
    return kt, vt, tl.zeros([BLOCK_K, BLOCK_DK], tl.float32), tl.zeros([BLOCK_K, BLOCK_DV], tl.float32)


@triton.jit
def _key_finish(dk_base, dv_base, k_tok, k_ok, s_dkn, s_dkd, s_dvn, s_dvd, offs_dk, dk_ok, offs_dv, dv_ok, dk, dv, scale):
    """Store ``dk = scale·Σ dsᵀ q`` and ``dv`` of a block of keys."""
    store_tile(dk_base, k_tok, k_ok, s_dkn, offs_dk, dk_ok, s_dkd, dk * scale)
    store_tile(dv_base, k_tok, k_ok, s_dvn, offs_dv, dv_ok, s_dvd, dv)


@triton.jit
def _load_queries(q_base, g_base, lse_ptr, delta_ptr, stat, tok, ok, s_qn, s_qd, s_gn, s_gd,
                  offs_dk, dk_ok, offs_dv, dv_ok, DOT_F32: tl.constexpr):
    """What the key side needs of a block of queries: q, dO, lse and δ."""
    qt = _load_rows(q_base, tok, ok, s_qn, offs_dk, dk_ok, s_qd, DOT_F32)
    dot = _load_rows(g_base, tok, ok, s_gn, offs_dv, dv_ok, s_gd, DOT_F32)
    lse = tl.load(lse_ptr + stat + tok, mask=ok, other=0.0)
    delta = tl.load(delta_ptr + stat + tok, mask=ok, other=0.0)
    return qt, dot, lse, delta


@triton.jit
def _key_query_range(
    kt, vt, k_ok, q_base, g_base, lse_ptr, delta_ptr, stat, q_lo, q_hi, s_qn, s_qd, s_gn, s_gd,
    offs_dk, dk_ok, offs_dv, dv_ok, qk_scale, dk, dv,
    BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk, dv updates of a block of keys from every query ``[q_lo, q_hi)``, unmasked, in blocks of ``BLOCK_M``."""
    offs_m = tl.arange(0, BLOCK_M)  # hoisted: shared with the caller's equal-sized ranges
    for start in range(q_lo, q_hi, BLOCK_M):
        tok = (start + offs_m).to(tl.int64)
        ok = tok < q_hi
        qt, dot, lse, delta = _load_queries(q_base, g_base, lse_ptr, delta_ptr, stat, tok, ok, s_qn, s_qd, s_gn, s_gd,
                                            offs_dk, dk_ok, offs_dv, dv_ok, DOT_F32)
        dk, dv = _key_step(kt, vt, qt, dot, lse, delta, k_ok[:, None] & ok[None, :], qk_scale, dk, dv, PRECISION)
    return dk, dv


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
    pid_bh, b, hh = program_head(1, H)
    y0, x0, ky, kx, k_ok, k_tok = _patch(pid_t, T, h, w, KH, KW)
    offs_dk, dk_ok = block_range(0, Dk, BLOCK_DK)
    offs_dv, dv_ok = block_range(0, Dv, BLOCK_DV)
    q_base = q_ptr + b * s_qb + hh * s_qh
    g_base = do_ptr + b * s_gb + hh * s_gh
    stat = pid_bh * N

    kt, vt, dk, dv = _key_start(k_ptr + b * s_kb + hh * s_kh, v_ptr + b * s_vb + hh * s_vh, k_tok, k_ok, s_kn, s_kd,
                                s_vn, s_vd, offs_dk, dk_ok, offs_dv, dv_ok, KH * KW, BLOCK_DK, BLOCK_DV, DOT_F32)

    # 1. prefix queries: all of them see every image key
    dk, dv = _key_query_range(kt, vt, k_ok, q_base, g_base, lse_ptr, delta_ptr, stat, 0, T, s_qn, s_qd, s_gn, s_gd,
                              offs_dk, dk_ok, offs_dv, dv_ok, qk_scale, dk, dv, BLOCK_M, DOT_F32, PRECISION)

    # 2. image queries: QH×QW patches around the key patch, masked by the (symmetric) disc
    offs_q = tl.arange(0, QH * QW)
    rq = offs_q // QW
    cq = offs_q % QW
    r2 = r * r
    base_y, i_lo, i_hi = _row_tiles(y0, r, h, n_row_tiles, QH)
    for i in range(i_lo, i_hi):
        qy = base_y + i * QH + rq
        base_x, j_lo, j_hi = _col_tiles(reach_ptr, i, x0, w, KW, QW)
        for j in range(j_lo, j_hi):
            qx = base_x + j * QW + cq
            ok = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
            tok = (T + qy * w + qx).to(tl.int64)
            qt, dot, lse, delta = _load_queries(q_base, g_base, lse_ptr, delta_ptr, stat, tok, ok, s_qn, s_qd, s_gn,
                                                s_gd, offs_dk, dk_ok, offs_dv, dv_ok, DOT_F32)
            dy = ky[:, None] - qy[None, :]
            dx = kx[:, None] - qx[None, :]
            allowed = k_ok[:, None] & ok[None, :] & (dy * dy + dx * dx < r2)
            dk, dv = _key_step(kt, vt, qt, dot, lse, delta, allowed, qk_scale, dk, dv, PRECISION)

    _key_finish(dk_ptr + b * s_dkb + hh * s_dkh, dv_ptr + b * s_dvb + hh * s_dvh, k_tok, k_ok, s_dkn, s_dkd, s_dvn,
                s_dvd, offs_dk, dk_ok, offs_dv, dv_ok, dk, dv, scale)


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
    pid_bh, b, hh = program_head(1, H)
    k_tok, k_ok = token_block(pid_n, K, BLOCK_N)
    offs_dk, dk_ok = block_range(0, Dk, BLOCK_DK)
    offs_dv, dv_ok = block_range(0, Dv, BLOCK_DV)
    q_base = q_ptr + b * s_qb + hh * s_qh
    g_base = do_ptr + b * s_gb + hh * s_gh
    stat = pid_bh * N

    kt, vt, dk, dv = _key_start(k_ptr + b * s_kb + hh * s_kh, v_ptr + b * s_vb + hh * s_vh, k_tok, k_ok, s_kn, s_kd,
                                s_vn, s_vd, offs_dk, dk_ok, offs_dv, dv_ok, BLOCK_N, BLOCK_DK, BLOCK_DV, DOT_F32)
    dk, dv = _key_query_range(kt, vt, k_ok, q_base, g_base, lse_ptr, delta_ptr, stat, q_lo, q_hi, s_qn, s_qd, s_gn,
                              s_gd, offs_dk, dk_ok, offs_dv, dv_ok, qk_scale, dk, dv, BLOCK_M, DOT_F32, PRECISION)

    _key_finish(dk_ptr + b * s_dkb + hh * s_dkh, dv_ptr + b * s_dvb + hh * s_dvh, k_tok, k_ok, s_dkn, s_dkd, s_dvn,
                s_dvd, offs_dk, dk_ok, offs_dv, dv_ok, dk, dv, scale)


@triton.jit(do_not_specialize=["N"])
def _wa_delta(
    o_ptr, do_ptr, delta_ptr, N, H, Dv,
    s_ob, s_on, s_oh, s_od,
    s_gb, s_gn, s_gh, s_gd,
    BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """``δ = Σ_d dO·O`` in fp32 for one block of tokens of one (batch, head)."""
    pid_t = tl.program_id(0)
    pid_bh, b, hh = program_head(1, H)
    tok, ok = token_block(pid_t, N, BLOCK_T)
    offs_d, d_ok = block_range(0, Dv, BLOCK_DV)
    o = _load_rows(o_ptr + b * s_ob + hh * s_oh, tok, ok, s_on, offs_d, d_ok, s_od, True)
    g = _load_rows(do_ptr + b * s_gb + hh * s_gh, tok, ok, s_gn, offs_d, d_ok, s_gd, True)
    tl.store(delta_ptr + pid_bh * N + tok, tl.sum(o * g, 1), mask=ok)
