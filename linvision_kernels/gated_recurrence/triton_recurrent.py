"""Triton kernels of the fused-recurrent gated / delta-rule scan; launch plan and autograd in :mod:`.triton`.

``_scan_fwd`` (grid ``(B·H, Dv tiles)``): the step of :mod:`.naive` token by token with the fp32 state tile
``[BLOCK_K, BLOCK_V]`` in registers; stores the state every ``CKPT`` steps. ``_scan_bwd`` (same grid): walks
the checkpoint intervals last to first; per interval it re-runs the forward steps from the checkpoint into a
per-program fp32 scratch ``[CKPT, BLOCK_K, BLOCK_V]`` (the state before each step), then walks the interval in
reverse with the state adjoint ``dS``. The value tiles are independent in the forward (the delta rule's
``Sᵀk`` is per value column); in the backward ``dq``, ``dk``, ``dg``, ``dβ`` sum over them (partials per tile).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_device import block_range, program_head


@triton.jit
def _first_token(N, REVERSE: tl.constexpr, zero):
    """int64 token index of step 0 and the token increment per step (``zero``: an int64 0 tensor)."""
    if REVERSE:
        return zero + N - 1, zero - 1
    return zero, zero + 1


@triton.jit
def _load_step(q_base, k_base, v_base, g_base, b_base, t,
               s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_gn, s_gd, s_bn,
               offs_k, mask_k, offs_v, mask_v, G_MODE: tl.constexpr, HAS_BETA: tl.constexpr):
    """fp32 ``q_t, k_t [BLOCK_K]``, ``v_t [BLOCK_V]``, log decay ``g_t [BLOCK_K]`` (0: none; 1: per head,
    broadcast; 2: per key channel) and ``β_t`` (1 without the delta rule) of token ``t``."""
    q = tl.load(q_base + t * s_qn + offs_k * s_qd, mask=mask_k, other=0.0).to(tl.float32)
    k = tl.load(k_base + t * s_kn + offs_k * s_kd, mask=mask_k, other=0.0).to(tl.float32)
    v = tl.load(v_base + t * s_vn + offs_v * s_vd, mask=mask_v, other=0.0).to(tl.float32)
    if G_MODE == 2:
        g = tl.load(g_base + t * s_gn + offs_k * s_gd, mask=mask_k, other=0.0).to(tl.float32)
    elif G_MODE == 1:
        g = tl.zeros_like(q) + tl.load(g_base + t * s_gn).to(tl.float32)
    else:
        g = tl.zeros_like(q)
    beta = 1.0
    if HAS_BETA:
        beta = tl.load(b_base + t * s_bn).to(tl.float32)
    return q, k, v, g, beta


@triton.jit
def _step(state, k, v, g, beta, G_MODE: tl.constexpr, HAS_BETA: tl.constexpr):
    """One step from the state before token t: the decayed state ``S_a = diag(e^g) S``, the prediction
    ``p = S_aᵀ k`` (delta rule; else 0), the new value ``u = β (v − p)`` (else ``v``) and ``S_a + k uᵀ``."""
    if G_MODE != 0:
        state = state * tl.exp(g)[:, None]
    p = tl.zeros_like(v)
    u = v
    if HAS_BETA:
        p = tl.sum(state * k[:, None], 0)
        u = beta * (v - p)
    return state, p, u, state + k[:, None] * u[None, :]


@triton.jit
def _ckpt_ptrs(ck_ptr, pid_bh, c, n_ck, Dk, Dv, offs_k, offs_v):
    """Pointers of checkpoint ``c`` of head ``pid_bh`` in the ``[B·H, n_ck, Dk, Dv]`` fp32 buffer."""
    base = ck_ptr + (pid_bh * n_ck + c) * Dk * Dv
    return base + offs_k[:, None] * Dv + offs_v[None, :]


@triton.jit(do_not_specialize=["N", "n_ck"])
def _scan_fwd(
    q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, o_ptr, ck_ptr,
    N, H, Dk, Dv, n_ck, scale,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_gb, s_gn, s_gh, s_gd,
    s_bb, s_bn, s_bh,
    s_ob, s_on, s_oh, s_od,
    G_MODE: tl.constexpr, HAS_BETA: tl.constexpr, EXCLUSIVE: tl.constexpr, REVERSE: tl.constexpr,
    ACCUMULATE: tl.constexpr, CKPT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One (batch, head) and Dv tile: ``o_t = scale·Sᵀq_t`` (after the write, or before it when EXCLUSIVE),
    added to ``o`` when ACCUMULATE; the state before step ``c·CKPT`` goes to checkpoint ``c``."""
    pid_bh, b, h = program_head(0, H)
    pid_v = tl.program_id(1)
    q_base = q_ptr + b * s_qb + h * s_qh
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    g_base = g_ptr + b * s_gb + h * s_gh
    b_base = b_ptr + b * s_bb + h * s_bh
    o_base = o_ptr + b * s_ob + h * s_oh
    offs_k, mask_k = block_range(0, Dk, BLOCK_K)
    offs_v, mask_v = block_range(pid_v * BLOCK_V, Dv, BLOCK_V)
    mask_kv = mask_k[:, None] & mask_v[None, :]
    t, dt = _first_token(N, REVERSE, pid_bh * 0)

    state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    for s in range(0, N):
        if s % CKPT == 0:
            tl.store(_ckpt_ptrs(ck_ptr, pid_bh, s // CKPT, n_ck, Dk, Dv, offs_k, offs_v), state, mask=mask_kv)
        q, k, v, g, beta = _load_step(q_base, k_base, v_base, g_base, b_base, t,
                                      s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_gn, s_gd, s_bn,
                                      offs_k, mask_k, offs_v, mask_v, G_MODE, HAS_BETA)
        decayed, p, u, state = _step(state, k, v, g, beta, G_MODE, HAS_BETA)
        if EXCLUSIVE:
            o = scale * tl.sum(decayed * q[:, None], 0)
        else:
            o = scale * tl.sum(state * q[:, None], 0)
        o_ptrs = o_base + t * s_on + offs_v * s_od
        if ACCUMULATE:
            o += tl.load(o_ptrs, mask=mask_v, other=0.0).to(tl.float32)
        tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=mask_v)
        t += dt


@triton.jit(do_not_specialize=["N", "n_ck"])
def _scan_bwd(
    q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, do_ptr, ck_ptr, scr_ptr,
    dq_ptr, dk_ptr, dv_ptr, dg_ptr, db_ptr,
    N, H, Dk, Dv, n_ck, scale, part_stride, gpart_stride, bpart_stride,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    s_gb, s_gn, s_gh, s_gd,
    s_bb, s_bn, s_bh,
    s_ob, s_on, s_oh, s_od,
    G_MODE: tl.constexpr, HAS_BETA: tl.constexpr, EXCLUSIVE: tl.constexpr, REVERSE: tl.constexpr,
    ACCUMULATE: tl.constexpr, ACCUMULATE_DG: tl.constexpr,
    CKPT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Gradients of :func:`_scan_fwd` for one (batch, head) and Dv tile, given ``dO`` (read through the
    ``s_o*`` strides). ``dv`` (fp32, layout of v, contiguous ``[B, N, H, Dv]``) is this tile's own; ``dq``,
    ``dk``, ``dg`` (contiguous ``[tiles, B, N, H, Dk or 1]``) and ``dβ`` (``[tiles, B, N, H]``) are per-tile
    partials at ``pid_v · part_stride`` (``gpart_stride``, ``bpart_stride``). ACCUMULATE adds to the buffers
    (the second scan of a bidirectional call), ACCUMULATE_DG likewise for ``dg`` (same gate in both)."""
    pid_bh, b, h = program_head(0, H)
    pid_v = tl.program_id(1)
    n_v = tl.num_programs(1)
    q_base = q_ptr + b * s_qb + h * s_qh
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    g_base = g_ptr + b * s_gb + h * s_gh
    b_base = b_ptr + b * s_bb + h * s_bh
    do_base = do_ptr + b * s_ob + h * s_oh
    offs_k, mask_k = block_range(0, Dk, BLOCK_K)
    offs_v, mask_v = block_range(pid_v * BLOCK_V, Dv, BLOCK_V)
    mask_kv = mask_k[:, None] & mask_v[None, :]
    # gradient buffers are contiguous: [B, N, H, D] (dv), [tiles, B, N, H, Dk or 1], [tiles, B, N, H]
    pid_v64 = pid_v.to(tl.int64)
    row_bh = b * N * H + h  # (b, token 0, h) as a row index of a [B, N, H, ·] buffer
    scr = scr_ptr + (pid_bh * n_v + pid_v64) * (CKPT * BLOCK_K * BLOCK_V)
    scr_tile = tl.arange(0, BLOCK_K)[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
    first, dt = _first_token(N, REVERSE, pid_bh * 0)

    d_state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    for cc in range(0, n_ck):
        c = n_ck - 1 - cc
        s0 = c * CKPT
        steps = tl.minimum(CKPT, N - s0)
        # 1. the states before each step of the interval, from its checkpoint
        state = tl.load(_ckpt_ptrs(ck_ptr, pid_bh, c, n_ck, Dk, Dv, offs_k, offs_v), mask=mask_kv, other=0.0)
        tl.debug_barrier()  # the scratch of the previous interval has been read
        t = first + s0 * dt
        for i in range(0, steps):
            tl.store(scr + i * (BLOCK_K * BLOCK_V) + scr_tile, state)
            q, k, v, g, beta = _load_step(q_base, k_base, v_base, g_base, b_base, t,
                                          s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_gn, s_gd, s_bn,
                                          offs_k, mask_k, offs_v, mask_v, G_MODE, HAS_BETA)
            _, _, _, state = _step(state, k, v, g, beta, G_MODE, HAS_BETA)
            t += dt
        tl.debug_barrier()  # the scratch is written
        # 2. the interval in reverse with the adjoint dS of the state after each step
        for j in range(0, steps):
            r = steps - 1 - j
            t = first + (s0 + r) * dt
            prev = tl.load(scr + r * (BLOCK_K * BLOCK_V) + scr_tile)
            q, k, v, g, beta = _load_step(q_base, k_base, v_base, g_base, b_base, t,
                                          s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_gn, s_gd, s_bn,
                                          offs_k, mask_k, offs_v, mask_v, G_MODE, HAS_BETA)
            decayed, p, u, state = _step(prev, k, v, g, beta, G_MODE, HAS_BETA)
            do = tl.load(do_base + t * s_on + offs_v * s_od, mask=mask_v, other=0.0).to(tl.float32)
            d_read = scale * q[:, None] * do[None, :]
            if EXCLUSIVE:
                dq = scale * tl.sum(decayed * do[None, :], 1)
            else:
                dq = scale * tl.sum(state * do[None, :], 1)
                d_state += d_read
            du = tl.sum(d_state * k[:, None], 0)  # [BLOCK_V]
            dk = tl.sum(d_state * u[None, :], 1)  # [BLOCK_K]
            d_decayed = d_state
            if EXCLUSIVE:
                d_decayed += d_read
            dv = du
            if HAS_BETA:
                dv = beta * du
                dp = -dv
                d_decayed += k[:, None] * dp[None, :]
                dk += tl.sum(decayed * dp[None, :], 1)
                d_beta = tl.sum(du * (v - p), 0)
                b_off = pid_v64 * bpart_stride + row_bh + t * H
                if ACCUMULATE:
                    d_beta += tl.load(db_ptr + b_off)
                tl.store(db_ptr + b_off, d_beta)
            row = row_bh + t * H
            dv_ptrs = dv_ptr + row * Dv + offs_v
            if ACCUMULATE:
                dv += tl.load(dv_ptrs, mask=mask_v, other=0.0)
            tl.store(dv_ptrs, dv, mask=mask_v)
            qk_ptrs = pid_v64 * part_stride + row * Dk + offs_k
            if ACCUMULATE:
                dq += tl.load(dq_ptr + qk_ptrs, mask=mask_k, other=0.0)
                dk += tl.load(dk_ptr + qk_ptrs, mask=mask_k, other=0.0)
            tl.store(dq_ptr + qk_ptrs, dq, mask=mask_k)
            tl.store(dk_ptr + qk_ptrs, dk, mask=mask_k)
            if G_MODE != 0:
                dg = tl.sum(d_decayed * decayed, 1)  # ∂/∂g_c of S_a = diag(e^g) S: row c of dS_a ⊙ S_a
                if G_MODE == 2:
                    g_ptrs = dg_ptr + pid_v64 * gpart_stride + row * Dk + offs_k
                    if ACCUMULATE_DG:
                        dg += tl.load(g_ptrs, mask=mask_k, other=0.0)
                    tl.store(g_ptrs, dg, mask=mask_k)
                else:
                    dg_sum = tl.sum(dg, 0)
                    g_ptr1 = dg_ptr + pid_v64 * gpart_stride + row
                    if ACCUMULATE_DG:
                        dg_sum += tl.load(g_ptr1)
                    tl.store(g_ptr1, dg_sum)
                d_state = d_decayed * tl.exp(g)[:, None]
            else:
                d_state = d_decayed
