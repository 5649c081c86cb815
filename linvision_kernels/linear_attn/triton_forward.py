"""Triton forward kernels of bidirectional linear attention (plan in :mod:`.triton`), and the fused feature map.

``_la_state_fwd`` accumulates fp32 partial states ``S``, ``z``, ``v̄`` over one split of the keys;
``_la_out_fwd`` forms ``o`` from the resident state for a chunk of query blocks.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_device import block_range, load_tile, program_head, split_blocks, store_tile, token_block


@triton.jit
def _phi(x, FMAP: tl.constexpr, offset):
    """Feature map on fp32 values: ``map(x) + offset`` with map 0 = identity, 1 = ReLU, 2 = ELU + 1."""
    if FMAP == 1:
        x = tl.maximum(x, 0.0)
    elif FMAP == 2:
        x = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    return x + offset


@triton.jit
def _load_features(base, offs_t, mask_t, s_n, offs_d, mask_d, s_d, phi_offset, PHI: tl.constexpr, FMAP: tl.constexpr):
    """A ``[tokens, D]`` feature tile in fp32, ``φ`` applied when ``PHI`` (padding re-masked to zero)."""
    x = load_tile(base, offs_t, mask_t, s_n, offs_d, mask_d, s_d).to(tl.float32)
    if PHI:
        x = tl.where(mask_t[:, None] & mask_d[None, :], _phi(x, FMAP, phi_offset), 0.0)
    return x


@triton.jit
def _state_tiles(pid_v, Dk, Dv, Dd, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and masks of all of Dk, of Dv tile ``pid_v`` and of all of Dd."""
    offs_k, mask_k = block_range(0, Dk, BLOCK_K)
    offs_v, mask_v = block_range(pid_v * BLOCK_V, Dv, BLOCK_V)
    offs_d, mask_d = block_range(0, Dd, BLOCK_D)
    return offs_k, mask_k, offs_v, mask_v, offs_d, mask_d


@triton.jit
def _store_partials(
    s_part, z_part, vb_part, part, acc, z_acc, vb_acc, offs_k, mask_k, offs_v, mask_v, offs_d, mask_d,
    Dk, Dv, Dd, pid_v, NORM: tl.constexpr,
):
    """Write one split's fp32 partials: the ``[Dk, BLOCK_V]`` tile, z (first Dv tile only), v̄ (``sub`` only)."""
    store_tile(s_part + part * Dk * Dv, offs_k, mask_k, Dv, offs_v, mask_v, 1, acc)
    if NORM != 0:
        if pid_v == 0:
            tl.store(z_part + part * Dd + offs_d, z_acc, mask=mask_d)
    if NORM == 2:
        tl.store(vb_part + part * Dv + offs_v, vb_acc, mask=mask_v)


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
    pid_bh, b, h = program_head(0, H)
    pid_s = tl.program_id(1)
    pid_v = tl.program_id(2)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    kd_base = kd_ptr + b * s_db + h * s_dh
    wk_base = wk_ptr + b * s_wkb + h * s_wkh
    wv_base = wv_ptr + b * s_wvb + h * s_wvh
    offs_k, mask_k, offs_v, mask_v, offs_d, mask_d = _state_tiles(pid_v, Dk, Dv, Dd, BLOCK_K, BLOCK_V, BLOCK_D)

    acc = tl.zeros((BLOCK_K, BLOCK_V), dtype=tl.float32)
    z_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    vb_acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    first, last = split_blocks(pid_s, blocks_per_split, M, BLOCK_T)
    for blk in range(first, last):
        offs_t, mask_t = token_block(blk, M, BLOCK_T)
        kk = _load_features(k_base, offs_t, mask_t, s_km, offs_k, mask_k, s_kd, phi_offset, PHI, FMAP)
        vv = load_tile(v_base, offs_t, mask_t, s_vm, offs_v, mask_v, s_vd).to(tl.float32)
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
                    kd = _load_features(kd_base, offs_t, mask_t, s_dm, offs_d, mask_d, s_dd, phi_offset, PHI, FMAP)
                    if HAS_WK:
                        kd = kd * wk[:, None]
                    z_acc += tl.sum(kd, 0)
                else:
                    z_acc += tl.sum(kk, 0)  # BLOCK_D == BLOCK_K here
        if NORM == 2:
            vb_acc += tl.sum(vv, 0)

    part = pid_s.to(tl.int64) * BH + pid_bh
    _store_partials(s_part, z_part, vb_part, part, acc, z_acc, vb_acc, offs_k, mask_k, offs_v, mask_v, offs_d, mask_d,
                    Dk, Dv, Dd, pid_v, NORM)


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
    pid_bh, b, h = program_head(0, H)
    pid_c = tl.program_id(1)
    pid_v = tl.program_id(2)
    q_base = q_ptr + b * s_qb + h * s_qh
    qd_base = qd_ptr + b * s_db + h * s_dh
    o_base = o_ptr + b * s_ob + h * s_oh
    offs_k, mask_k, offs_v, mask_v, offs_d, mask_d = _state_tiles(pid_v, Dk, Dv, Dd, BLOCK_K, BLOCK_V, BLOCK_D)

    st = load_tile(s_ptr + pid_bh * Dk * Dv, offs_k, mask_k, Dv, offs_v, mask_v, 1)
    if NORM != 0:
        z = tl.load(z_ptr + pid_bh * Dd + offs_d, mask=mask_d, other=0.0)
    if NORM == 2:
        vb = tl.load(vb_ptr + pid_bh * Dv + offs_v, mask=mask_v, other=0.0)

    first, last = split_blocks(pid_c, blocks_per_chunk, N, BLOCK_T)
    for blk in range(first, last):
        offs_t, mask_t = token_block(blk, N, BLOCK_T)
        q = load_tile(q_base, offs_t, mask_t, s_qn, offs_k, mask_k, s_qd).to(tl.float32)
        if PHI:  # padded query rows are never stored: only the channel padding is re-masked
            q = tl.where(mask_k[None, :], _phi(q, FMAP, phi_offset), 0.0)
        num = tl.dot(q, st, input_precision=PRECISION)
        if NORM != 0:
            if HAS_DEN:
                qd = load_tile(qd_base, offs_t, mask_t, s_dn, offs_d, mask_d, s_dd).to(tl.float32)
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
        store_tile(o_base, offs_t, mask_t, s_on, offs_v, mask_v, s_od, out)
