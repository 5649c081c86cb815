"""Triton backward kernels of bidirectional linear attention (plan in :mod:`.triton`).

``_la_query_bwd`` (dq, dqd per token; partial dS, dz, dv̄ over one split of the queries) and ``_la_key_bwd``
(dk, dv, dkd, dwk, dwv per token from dS, dz, dv̄).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_device import block_range, load_tile, program_head, split_blocks, store_tile, token_block
from .triton_forward import _load_features, _phi, _state_tiles, _store_partials


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


@triton.jit
def _chain_dphi(dx, base, offs_t, mask_t, s_n, offs_d, mask_d, s_d, PHI: tl.constexpr, FMAP: tl.constexpr):
    """``dx · φ'`` at the raw values at ``base`` (re-read: a cache hit), when a feature map is fused."""
    if PHI:
        if FMAP != 0:
            raw = load_tile(base, offs_t, mask_t, s_n, offs_d, mask_d, s_d).to(tl.float32)
            dx = dx * _dphi(raw, FMAP)
    return dx


@triton.jit
def _row_tile(dq, t, do_w, s_base, vb_base, offs_k, mask_k, offs_w, mask_w, Dv,
              NORM: tl.constexpr, NEED_DQ: tl.constexpr, PRECISION: tl.constexpr):
    """One Dv tile of the row pass: dq += dO_w S_wᵀ (also needed for div's dO·qS); t += dO_w·v̄_w (sub)."""
    if NEED_DQ or NORM == 1:
        s_w = load_tile(s_base, offs_k, mask_k, Dv, offs_w, mask_w, 1)
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
    pid_bh, b, h = program_head(0, H)
    pid_s = tl.program_id(1)
    pid_v = tl.program_id(2)
    q_base = q_ptr + b * s_qb + h * s_qh
    qd_base = qd_ptr + b * s_db + h * s_dh
    do_base = do_ptr + b * s_gb + h * s_gh
    dq_base = dq_ptr + b * s_dqb + h * s_dqh
    dqd_base = dqd_ptr + b * s_ddb + h * s_ddh
    s_base = s_ptr + pid_bh * Dk * Dv
    offs_k, mask_k, offs_v, mask_v, offs_d, mask_d = _state_tiles(pid_v, Dk, Dv, Dd, BLOCK_K, BLOCK_V, BLOCK_D)
    if NORM != 0:
        z = tl.load(z_ptr + pid_bh * Dd + offs_d, mask=mask_d, other=0.0)

    ds_acc = tl.zeros((BLOCK_K, BLOCK_V), dtype=tl.float32)
    dz_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dvb_acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    first, last = split_blocks(pid_s, blocks_per_split, N, BLOCK_T)
    for blk in range(first, last):
        offs_t, mask_t = token_block(blk, N, BLOCK_T)
        q = _load_features(q_base, offs_t, mask_t, s_qn, offs_k, mask_k, s_qd, phi_offset, PHI, FMAP)
        do = load_tile(do_base, offs_t, mask_t, s_gn, offs_v, mask_v, s_gd).to(tl.float32)
        if NORM != 0:
            if HAS_DEN:
                qd = _load_features(qd_base, offs_t, mask_t, s_dn, offs_d, mask_d, s_dd, phi_offset, PHI, FMAP)
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
                    offs_w, mask_w = block_range(v0, Dv, ROW_V)
                    do_w = load_tile(do_base, offs_t, mask_t, s_gn, offs_w, mask_w, s_gd).to(tl.float32)
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
                    dq = _chain_dphi(dq, q_base, offs_t, mask_t, s_qn, offs_k, mask_k, s_qd, PHI, FMAP)
                    store_tile(dq_base, offs_t, mask_t, s_dqn, offs_k, mask_k, s_dqd, dq)
                if NEED_DQD:
                    dqd = dqz[:, None] * z[None, :]
                    dqd = _chain_dphi(dqd, qd_base, offs_t, mask_t, s_dn, offs_d, mask_d, s_dd, PHI, FMAP)
                    store_tile(dqd_base, offs_t, mask_t, s_ddn, offs_d, mask_d, s_ddd, dqd)
                if NORM != 0:
                    dz_acc += tl.sum(dqz[:, None] * qd, 0)

    part = pid_s.to(tl.int64) * BH + pid_bh
    _store_partials(ds_part, dz_part, dvb_part, part, ds_acc, dz_acc, dvb_acc, offs_k, mask_k, offs_v, mask_v,
                    offs_d, mask_d, Dk, Dv, Dd, pid_v, NORM)


@triton.jit
def _key_tile(
    dkt, dwv, kw, wv, ds, dvb, v_base, dv_base, offs_t, mask_t, offs_v, mask_v, s_vm, s_vd, s_gvm, s_gvd, dv_ptr,
    NORM: tl.constexpr, HAS_WV: tl.constexpr, NEED_DKT: tl.constexpr, NEED_DV: tl.constexpr,
    NEED_DWV: tl.constexpr, PRECISION: tl.constexpr,
):
    """One Dv tile of the key side: dk̃ += ṽ dSᵀ; dṽ = k̃ dS + dv̄ → dv, and dwv += v·dṽ."""
    vv = load_tile(v_base, offs_t, mask_t, s_vm, offs_v, mask_v, s_vd).to(tl.float32)
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
            store_tile(dv_base, offs_t, mask_t, s_gvm, offs_v, mask_v, s_gvd, dv)
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
    pid_bh, b, h = program_head(0, H)
    pid_c = tl.program_id(1)
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

    offs_k, mask_k = block_range(0, Dk, BLOCK_K)
    offs_d, mask_d = block_range(0, Dd, BLOCK_D)
    offs_v, mask_v = block_range(0, Dv, BLOCK_V)
    dvb = tl.zeros((BLOCK_V,), dtype=tl.float32)
    if V_TILES == 1:
        ds = load_tile(ds_base, offs_k, mask_k, Dv, offs_v, mask_v, 1)
        if NORM == 2:
            dvb = tl.load(dvb_ptr + pid_bh * Dv + offs_v, mask=mask_v, other=0.0)
    if NORM != 0:
        dz = tl.load(dz_ptr + pid_bh * Dd + offs_d, mask=mask_d, other=0.0)

    first, last = split_blocks(pid_c, blocks_per_chunk, M, BLOCK_T)
    for blk in range(first, last):
        offs_t, mask_t = token_block(blk, M, BLOCK_T)
        mask_tk = mask_t[:, None] & mask_k[None, :]
        k_raw = load_tile(k_base, offs_t, mask_t, s_km, offs_k, mask_k, s_kd)
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
                offs_w, mask_w = block_range(v0, Dv, BLOCK_V)
                ds_w = load_tile(ds_base, offs_k, mask_k, Dv, offs_w, mask_w, 1)
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
            store_tile(dk_base, offs_t, mask_t, s_gkm, offs_k, mask_k, s_gkd, dk)
        if NEED_DKD:
            dkd = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32) + dz[None, :]
            if HAS_WK:
                dkd = dkd * wk[:, None]
            dkd = _chain_dphi(dkd, kd_base, offs_t, mask_t, s_dm, offs_d, mask_d, s_dd, PHI, FMAP)
            store_tile(dkd_base, offs_t, mask_t, s_gdm, offs_d, mask_d, s_gdd, dkd)
        if NEED_DWK:
            dwk = tl.sum(k * dkt, 1)
            if NORM != 0:
                if HAS_DEN:
                    kd = _load_features(kd_base, offs_t, mask_t, s_dm, offs_d, mask_d, s_dd, phi_offset, PHI, FMAP)
                else:
                    kd = k
                dwk += tl.sum(kd * dz[None, :], 1)
            tl.store(dwk_base + offs_t * s_gwkm, dwk.to(dwk_ptr.dtype.element_ty), mask=mask_t)
        if NEED_DWV:
            tl.store(dwv_base + offs_t * s_gwvm, dwv.to(dwv_ptr.dtype.element_ty), mask=mask_t)
