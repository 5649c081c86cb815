"""Triton kernels of the non-causal additive scan (one key-softmax over all tokens); plan in :mod:`.triton`.

``_nc_state_fwd`` (online-softmax partials per split), ``_nc_out_fwd`` (``o = q S``), ``_nc_query_bwd``
(``dq = dO Sᵀ`` and partial ``dS``) and ``_nc_key_bwd`` (``dv``, ``df``, ``dκ`` per key block).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_device import (
    block_range,
    flat_head_block,
    load_tile,
    program_head,
    split_blocks,
    store_tile,
    token_block,
)


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
    pid_bh, b, h = program_head(0, H)
    pid_s = tl.program_id(1)
    pid_v = tl.program_id(2)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    mod_base = mod_ptr + b * s_mb + h * s_mh
    offs_k, mask_k = block_range(0, Dk, BLOCK_K)
    offs_v, mask_v = block_range(pid_v * BLOCK_V, Dv, BLOCK_V)

    m_run = tl.full([BLOCK_K], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    first, last = split_blocks(pid_s, blocks_per_split, N, BLOCK_T)
    for blk in range(first, last):
        offs_t, mask_t = token_block(blk, N, BLOCK_T)
        f = load_tile(k_base, offs_t, mask_t, s_kn, offs_k, mask_k, s_kd, float("-inf"))
        f = f.to(tl.float32)
        vv = load_tile(v_base, offs_t, mask_t, s_vn, offs_v, mask_v, s_vd).to(tl.float32)
        m_new = tl.maximum(m_run, tl.max(f, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)
        p = tl.exp(f - m_safe[None, :])
        l_run = l_run * alpha + tl.sum(p, 0)
        if HAS_MOD:
            p = p * load_tile(mod_base, offs_t, mask_t, s_mn, offs_k, mask_k, s_md).to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(tl.trans(p), vv, acc, input_precision=PRECISION)
        m_run = m_new

    part = pid_s.to(tl.int64) * BH + pid_bh
    store_tile(s_part + part * Dk * Dv, offs_k, mask_k, Dv, offs_v, mask_v, 1, acc)
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
    pid_bh, b, h, blk, offs_t, mask_t = flat_head_block(num_blocks, H, N, BLOCK_T)
    offs_k, mask_k = block_range(0, Dk, BLOCK_K)
    q = load_tile(q_ptr + b * s_qb + h * s_qh, offs_t, mask_t, s_qn, offs_k, mask_k, s_qd).to(tl.float32)
    s_base = s_ptr + pid_bh * Dk * Dv
    o_base = o_ptr + b * s_ob + h * s_oh
    for v0 in range(0, Dv, BLOCK_V):
        offs_v, mask_v = block_range(v0, Dv, BLOCK_V)
        st = load_tile(s_base, offs_k, mask_k, Dv, offs_v, mask_v, 1)
        out = tl.dot(q, st, input_precision=PRECISION)
        store_tile(o_base, offs_t, mask_t, s_on, offs_v, mask_v, s_od, out)


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
    pid_bh, b, h = program_head(0, H)
    pid_s = tl.program_id(1)
    pid_v = tl.program_id(2)
    q_base = q_ptr + b * s_qb + h * s_qh
    do_base = do_ptr + b * s_gb + h * s_gh
    dq_base = dq_ptr + b * s_dqb + h * s_dqh
    s_base = s_ptr + pid_bh * Dk * Dv
    offs_k, mask_k = block_range(0, Dk, BLOCK_K)
    offs_v, mask_v = block_range(pid_v * BLOCK_V, Dv, BLOCK_V)

    ds_acc = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    first, last = split_blocks(pid_s, blocks_per_split, N, BLOCK_T)
    for blk in range(first, last):
        offs_t, mask_t = token_block(blk, N, BLOCK_T)
        q = load_tile(q_base, offs_t, mask_t, s_qn, offs_k, mask_k, s_qd).to(tl.float32)
        do = load_tile(do_base, offs_t, mask_t, s_gn, offs_v, mask_v, s_gd).to(tl.float32)
        ds_acc = tl.dot(tl.trans(q), do, ds_acc, input_precision=PRECISION)
        if NEED_DQ:
            if pid_v == 0:
                dq = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
                for v0 in range(0, Dv, BLOCK_V):
                    offs_w, mask_w = block_range(v0, Dv, BLOCK_V)
                    do_w = load_tile(do_base, offs_t, mask_t, s_gn, offs_w, mask_w, s_gd).to(tl.float32)
                    s_w = load_tile(s_base, offs_k, mask_k, Dv, offs_w, mask_w, 1)
                    dq = tl.dot(do_w, tl.trans(s_w), dq, input_precision=PRECISION)
                store_tile(dq_base, offs_t, mask_t, s_dqn, offs_k, mask_k, s_dqd, dq)

    part = pid_s.to(tl.int64) * BH + pid_bh
    store_tile(ds_part + part * Dk * Dv, offs_k, mask_k, Dv, offs_v, mask_v, 1, ds_acc)


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
    pid_bh, b, h, blk, offs_t, mask_t = flat_head_block(num_blocks, H, N, BLOCK_T)
    offs_k, mask_k = block_range(0, Dk, BLOCK_K)
    mask_tk = mask_t[:, None] & mask_k[None, :]

    f = load_tile(k_ptr + b * s_kb + h * s_kh, offs_t, mask_t, s_kn, offs_k, mask_k, s_kd).to(tl.float32)
    z = tl.load(z_ptr + pid_bh * Dk + offs_k, mask=mask_k, other=0.0)
    z = tl.where(z == float("-inf"), 0.0, z)
    p = tl.where(mask_tk, tl.exp(f - z[None, :]), 0.0)
    if HAS_MOD:
        mod = load_tile(mod_ptr + b * s_mb + h * s_mh, offs_t, mask_t, s_mn, offs_k, mask_k, s_md).to(tl.float32)
        kbar = p * mod
    else:
        kbar = p
    dkbar = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    s_base = ds_ptr + pid_bh * Dk * Dv
    for v0 in range(0, Dv, BLOCK_V):
        offs_v, mask_v = block_range(v0, Dv, BLOCK_V)
        ds = load_tile(s_base, offs_k, mask_k, Dv, offs_v, mask_v, 1)
        if NEED_DK or NEED_DMOD:
            vv = load_tile(v_ptr + b * s_vb + h * s_vh, offs_t, mask_t, s_vn, offs_v, mask_v, s_vd).to(tl.float32)
            dkbar = tl.dot(vv, tl.trans(ds), dkbar, input_precision=PRECISION)
        if NEED_DV:
            dv = tl.dot(kbar, ds, input_precision=PRECISION)
            store_tile(dv_ptr + b * s_gvb + h * s_gvh, offs_t, mask_t, s_gvn, offs_v, mask_v, s_gvd, dv)
    if NEED_DK:
        r = tl.load(r_ptr + pid_bh * Dk + offs_k, mask=mask_k, other=0.0)
        if HAS_MOD:
            df = p * (mod * dkbar - r[None, :])
        else:
            df = p * (dkbar - r[None, :])
        store_tile(dk_ptr + b * s_gkb + h * s_gkh, offs_t, mask_t, s_gkn, offs_k, mask_k, s_gkd, df)
    if NEED_DMOD:
        store_tile(dmod_ptr + b * s_gmb + h * s_gmh, offs_t, mask_t, s_gmn, offs_k, mask_k, s_gmd, p * dkbar)
