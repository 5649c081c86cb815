"""Triton kernels of the causal additive scan (chunked, ``CHUNK`` = 16 tokens); plan in :mod:`.triton`.

``_c_fwd`` (the forward scan; stores ``z`` at the chunk boundaries), ``_c_dq`` (the forward scan again for
``dq``) and ``_c_bwd`` (the reverse scan for ``dv``, ``df``, ``dκ``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_device import block_range, load_tile, program_head, store_tile, token_block


@triton.jit
def _chunk_lse(f, z_prev, CHUNK: tl.constexpr):
    """Per token t of a chunk: z_t = log(e^{z_prev} + Σ_{s≤t} e^{f_s}) per channel, exactly.

    Returns the masked pair tensor f3[t, s, c] = f_sc (s ≤ t, else −inf), z [CHUNK, BLOCK_K] and z with −inf
    replaced by 0 (the safe exponent reference).
    """
    i = tl.arange(0, CHUNK)
    causal = i[None, :] <= i[:, None]
    f3 = tl.where(causal[:, :, None], f[None, :, :], float("-inf"))
    mx = tl.maximum(tl.max(f3, 1), z_prev[None, :])
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    tot = tl.sum(tl.exp(f3 - mx[:, None, :]), 1) + tl.exp(z_prev[None, :] - mx)  # ≥ 1 unless all −inf
    z = tl.where(tot > 0.0, mx + tl.log(tl.maximum(tot, 1.0)), float("-inf"))
    return f3, z, tl.where(z == float("-inf"), 0.0, z)


@triton.jit
def _last_row(z, CHUNK: tl.constexpr):
    """z[CHUNK − 1, :] (the value at the chunk end; padded rows repeat the last valid token's)."""
    i = tl.arange(0, CHUNK)
    return tl.sum(tl.where((i == CHUNK - 1)[:, None], z, 0.0), 0)


@triton.jit
def _chunk_bounds(zb_base, c, Dk, offs_k, mask_k):
    """z at the start and at the end of chunk ``c`` (stored by the forward)."""
    z_prev = tl.load(zb_base + c * Dk + offs_k, mask=mask_k, other=float("-inf"))
    z_last = tl.load(zb_base + (c + 1) * Dk + offs_k, mask=mask_k, other=float("-inf"))
    return z_prev, z_last


@triton.jit
def _load_logits(k_base, offs_t, mask_t, s_kn, offs_k, mask_k, s_kd):
    """The keys (log-weights) of a chunk in fp32, −inf where masked."""
    return load_tile(k_base, offs_t, mask_t, s_kn, offs_k, mask_k, s_kd, float("-inf")).to(tl.float32)


@triton.jit
def _advance(state, f, vv, mod, z_prev, z_last, HAS_MOD: tl.constexpr, PRECISION: tl.constexpr):
    """The normalised state at the chunk end: ``e^{z_prev − z_last} S + Σ_s (e^{f_s − z_last} κ_s) v_sᵀ``."""
    zl = tl.where(z_last == float("-inf"), 0.0, z_last)
    kk = tl.exp(f - zl[None, :])
    if HAS_MOD:
        kk = kk * mod
    state = state * tl.exp(z_prev - zl)[:, None]
    return tl.dot(tl.trans(kk), vv, state, input_precision=PRECISION)


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
    pid_bh, b, h = program_head(0, H)
    pid_v = tl.program_id(1)
    q_base = q_ptr + b * s_qb + h * s_qh
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    mod_base = mod_ptr + b * s_mb + h * s_mh
    o_base = o_ptr + b * s_ob + h * s_oh
    zb_base = zb_ptr + pid_bh * (n_chunks + 1) * Dk
    offs_k, mask_k = block_range(0, Dk, BLOCK_K)
    offs_v, mask_v = block_range(pid_v * BLOCK_V, Dv, BLOCK_V)

    z_prev = tl.zeros([BLOCK_K], dtype=tl.float32) + lse_init
    state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    for c in range(0, n_chunks):
        if pid_v == 0:
            tl.store(zb_base + c * Dk + offs_k, z_prev, mask=mask_k)
        offs_t, mask_t = token_block(c, N, CHUNK)
        q = load_tile(q_base, offs_t, mask_t, s_qn, offs_k, mask_k, s_qd).to(tl.float32)
        f = _load_logits(k_base, offs_t, mask_t, s_kn, offs_k, mask_k, s_kd)
        vv = load_tile(v_base, offs_t, mask_t, s_vn, offs_v, mask_v, s_vd).to(tl.float32)
        f3, z, zs = _chunk_lse(f, z_prev, CHUNK)
        out = tl.dot(q * tl.exp(z_prev[None, :] - zs), state, input_precision=PRECISION)
        w3 = tl.exp(f3 - zs[:, None, :])
        mod = f  # unused without k_mod
        if HAS_MOD:
            mod = load_tile(mod_base, offs_t, mask_t, s_mn, offs_k, mask_k, s_md).to(tl.float32)
            w3 = w3 * mod[None, :, :]
        scores = tl.sum(q[:, None, :] * w3, 2)
        out = tl.dot(scores, vv, out, input_precision=PRECISION)
        store_tile(o_base, offs_t, mask_t, s_on, offs_v, mask_v, s_od, out)

        z_last = _last_row(z, CHUNK)
        state = _advance(state, f, vv, mod, z_prev, z_last, HAS_MOD, PRECISION)
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
    pid_bh, b, h = program_head(0, H)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    mod_base = mod_ptr + b * s_mb + h * s_mh
    do_base = do_ptr + b * s_gb + h * s_gh
    dq_base = dq_ptr + b * s_dqb + h * s_dqh
    zb_base = zb_ptr + pid_bh * (n_chunks + 1) * Dk
    offs_k, mask_k = block_range(0, Dk, BLOCK_K)
    offs_v, mask_v = block_range(0, Dv, BLOCK_V)

    state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    for c in range(0, n_chunks):
        z_prev, z_last = _chunk_bounds(zb_base, c, Dk, offs_k, mask_k)
        offs_t, mask_t = token_block(c, N, CHUNK)
        f = _load_logits(k_base, offs_t, mask_t, s_kn, offs_k, mask_k, s_kd)
        vv = load_tile(v_base, offs_t, mask_t, s_vn, offs_v, mask_v, s_vd).to(tl.float32)
        do = load_tile(do_base, offs_t, mask_t, s_gn, offs_v, mask_v, s_gd).to(tl.float32)
        f3, _, zs = _chunk_lse(f, z_prev, CHUNK)
        dq = tl.dot(do, tl.trans(state), input_precision=PRECISION) * tl.exp(z_prev[None, :] - zs)
        w3 = tl.exp(f3 - zs[:, None, :])
        mod = f  # unused without k_mod
        if HAS_MOD:
            mod = load_tile(mod_base, offs_t, mask_t, s_mn, offs_k, mask_k, s_md).to(tl.float32)
            w3 = w3 * mod[None, :, :]
        vdo = tl.dot(do, tl.trans(vv), input_precision=PRECISION)  # [t, s] = dO_t · v_s
        dq += tl.sum(vdo[:, :, None] * w3, 1)
        store_tile(dq_base, offs_t, mask_t, s_dqn, offs_k, mask_k, s_dqd, dq)

        state = _advance(state, f, vv, mod, z_prev, z_last, HAS_MOD, PRECISION)


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
    pid_bh, b, h = program_head(0, H)
    q_base = q_ptr + b * s_qb + h * s_qh
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    mod_base = mod_ptr + b * s_mb + h * s_mh
    do_base = do_ptr + b * s_gb + h * s_gh
    dq_base = dq_ptr + b * s_dqb + h * s_dqh
    zb_base = zb_ptr + pid_bh * (n_chunks + 1) * Dk
    offs_k, mask_k = block_range(0, Dk, BLOCK_K)
    offs_v, mask_v = block_range(0, Dv, BLOCK_V)

    d_state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    r_carry = tl.zeros([BLOCK_K], dtype=tl.float32)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        z_prev, z_last = _chunk_bounds(zb_base, c, Dk, offs_k, mask_k)
        offs_t, mask_t = token_block(c, N, CHUNK)
        q = load_tile(q_base, offs_t, mask_t, s_qn, offs_k, mask_k, s_qd).to(tl.float32)
        f = _load_logits(k_base, offs_t, mask_t, s_kn, offs_k, mask_k, s_kd)
        vv = load_tile(v_base, offs_t, mask_t, s_vn, offs_v, mask_v, s_vd).to(tl.float32)
        do = load_tile(do_base, offs_t, mask_t, s_gn, offs_v, mask_v, s_gd).to(tl.float32)
        dq = load_tile(dq_base, offs_t, mask_t, s_dqn, offs_k, mask_k, s_dqd)
        f3, _, zs = _chunk_lse(f, z_prev, CHUNK)
        zl = tl.where(z_last == float("-inf"), 0.0, z_last)

        # later chunks, through the carries (reference z_last)
        pp = tl.exp(f - zl[None, :])  # [s, K]
        if HAS_MOD:
            mod = load_tile(mod_base, offs_t, mask_t, s_mn, offs_k, mask_k, s_md).to(tl.float32)
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
            store_tile(dv_ptr + b * s_gvb + h * s_gvh, offs_t, mask_t, s_gvn, offs_v, mask_v, s_gvd, dv)
        if NEED_DK:
            if HAS_MOD:
                df = mod * e_acc - zt
            else:
                df = e_acc - zt
            store_tile(dk_ptr + b * s_gkb + h * s_gkh, offs_t, mask_t, s_gkn, offs_k, mask_k, s_gkd, df)
        if NEED_DMOD:
            store_tile(dmod_ptr + b * s_gmb + h * s_gmh, offs_t, mask_t, s_gmn, offs_k, mask_k, s_gmd, e_acc)

        # carries to the previous chunk end (reference z_prev)
        g = tl.exp(z_prev[None, :] - zs)  # [t, K]
        decay = tl.exp(z_prev - zl)
        d_state = d_state * decay[:, None]
        d_state = tl.dot(tl.trans(q * g), do, d_state, input_precision=PRECISION)
        r_carry = r_carry * decay + tl.sum(qdq * g, 0)
