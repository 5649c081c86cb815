"""Triton forward and backward of the chunked 2-D pLSTM scan.

What runs where (:func:`plstm2d_triton`):

1. PyTorch: per orientation, the gates (``[B, N, H]`` scalars, cheap) are flipped into the orientation's
   frame, padded at the frame's high end to whole ``C × C`` chunks, and turned into the chunk transfer
   matrices by log doubling (:mod:`.doubling`): ``trl, tru, tdl, tdu [C, C]``, ``sr, sd [C, C²]``,
   ``ml, mu [C², C]``, ``g [C², C²]`` per chunk, fp32, ``[B, H, O, NX, NY, ·, ·]``. Differentiable: the
   gates get their gradients from the matrices' gradients through autograd.
2. Triton, :func:`_plstm_scan_fwd`, grid ``(B·H·O, Dv tiles)``: one program walks its frame's chunks in
   raster order (a sequential program needs no wavefront) and, for each chunk and each key channel ``d``
   (states of different ``(d, e)`` never mix when J = 1), reads the chunk's input borders
   ``L, U [C, BLOCK_V]``, writes the inter-chunk output ``s·q_d (M^l L + M^u U)`` and passes
   ``R = trl L + tru U + sr (k_d v)``, ``B = tdl L + tdu U + sd (k_d v)`` on through a small fp32 scratch
   (one chunk row of right borders plus one bottom border, double-buffered by chunk parity). q, k, v are
   read in place through their strides: the orientation flip and the padding are index arithmetic and
   masks, never copies.
3. Triton, :func:`_plstm_intra_fwd`, grid ``(B·H·O·chunks, row blocks, Dv tiles)``, fully parallel: adds
   the intra-chunk ``s·(G ⊙ Q Kᵀ) V``.
4. PyTorch: the orientations are summed (an fp32 ``[O, B, N, H, Dv]`` buffer, fully written by step 2) and
   the direct term ``d·s·(q·k)·v`` is added.

Backward (:class:`_ChunkScan`, :func:`chunk_scan_triton_bwd`; saved: q, k, v and the chunk matrices):

1. the forward scan runs again and stores every chunk's input borders ``L, U`` (``[B·H·O, NX, NY, Dk, C,
   Dv]`` fp32 each: ``2·Dk·Dv/C`` floats per node and orientation);
2. :func:`_plstm_scan_bwd`, grid ``(B·H·O,)``, all of Dv per program: walks the chunks in reverse raster
   order with adjoint borders (``dL = trlᵀ dR + tdlᵀ dB + mlᵀ (s q_d dO)`` …), writes dq, dk, dv into
   per-orientation fp32 buffers and the chunk-matrix gradients (outer products with the stored borders);
3. :func:`_plstm_intra_bwd`, grid ``(B·H·O·chunks,)``: the intra-chunk part, ``dG`` included;
4. PyTorch sums the orientations; autograd carries the matrix gradients through the doubling to the gates.

With ``Dk`` or ``Dv`` above ``MAX_BWD_DIM`` the backward instead re-runs the PyTorch chunked scan
(:func:`.chunked.chunk_scan`) under autograd, like the official ``pLSTM2D_fwbw`` recomputation.

Numerics: every operand is upcast to fp32 on load (the interpreter's bf16 ``tl.dot`` is wrong), states and
accumulators are fp32. Matrix products use ``tl.dot`` only when every dimension is ≥ 16 (``C ≥ 16`` and
``BLOCK_V ≥ 16``; the GPU minimum), else a broadcast-multiply-sum. Offsets are int64. None of this has
run on a GPU yet (``tests/kernels/test_plstm_gpu.py`` is the check to run there).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_device import block_range, load_tile
from ..triton_support import dot_precision, pow2_block
from .chunked import chunk_scan, frame_cell_matrices
from .frames import from_frames, to_frames
from .naive import direct_term

_CM_FIELDS = ("trl", "tru", "tdl", "tdu", "sr", "sd", "ml", "mu", "g")


@triton.jit
def _mm(a, b, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ b`` in fp32: ``tl.dot`` when every dimension is ≥ 16, else a broadcast-multiply-sum."""
    if DOT:
        return tl.dot(a, b, input_precision=PRECISION)
    else:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _node_tokens(offs_n, cx, cy, X, Y, flip_x, flip_y, C: tl.constexpr):
    """Token index (raster order of the original grid) of the local nodes ``offs_n`` of chunk ``(cx, cy)`` in a
    flipped frame, and their validity mask."""
    xf = cx * C + offs_n // C
    yf = cy * C + offs_n % C
    valid = (xf < X) & (yf < Y)
    xo = tl.where(flip_x, X - 1 - xf, xf)
    yo = tl.where(flip_y, Y - 1 - yf, yf)
    tok = tl.where(valid, xo.to(tl.int64) * Y + yo, 0)
    return tok, valid


@triton.jit
def _chunk_tokens(cx, cy, X, Y, flip_x, flip_y, C: tl.constexpr):
    """Token index and validity of all ``C²`` nodes of a chunk."""
    return _node_tokens(tl.arange(0, C * C), cx, cy, X, Y, flip_x, flip_y, C)


@triton.jit
def _frame(frame, O, H):
    """Batch, head and orientation of a frame ``(b·H + h)·O + o``, and the orientation's flips."""
    o = frame % O
    bh = frame // O
    h = bh % H
    b = bh // H
    return b, h, o, (o == 1) | (o == 3), (o == 2) | (o == 3)


@triton.jit
def _chunk_of(pid, NX, NY, O, H):
    """Decode a flat ``(frame, chunk)`` program id: frame, chunk, its grid position and the frame's b, h, o, flips."""
    chunk = pid % (NX * NY)
    frame = pid // (NX * NY)
    b, h, o, flip_x, flip_y = _frame(frame, O, H)
    return frame, chunk, chunk // NY, chunk % NY, b, h, o, flip_x, flip_y


@triton.jit
def _border_slots(cx, cy, NY, Dk, C: tl.constexpr, Dv):
    """Offsets of the double-buffered border scratch for chunk ``(cx, cy)``: the right-border row slot to read (written
    by the previous chunk row in scan order) and to write, and the same for the bottom-border slot."""
    rd = ((cx + 1) % 2) * NY * Dk * C * Dv + cy * Dk * C * Dv
    wr = (cx % 2) * NY * Dk * C * Dv + cy * Dk * C * Dv
    ud = ((cy + 1) % 2) * Dk * C * Dv
    uw = (cy % 2) * Dk * C * Dv
    return rd, wr, ud, uw


@triton.jit
def _accumulate(ptrs, mask, value):
    """``*ptrs += value`` where ``mask`` (the buffer belongs to this program)."""
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + value, mask=mask)


@triton.jit(do_not_specialize=["X", "Y", "NX", "NY"])
def _plstm_scan_fwd(
    q_ptr, k_ptr, v_ptr,
    trl_ptr, tru_ptr, tdl_ptr, tdu_ptr, sr_ptr, sd_ptr, ml_ptr, mu_ptr,
    rows_ptr, ucar_ptr, out_ptr, lbuf_ptr, ubuf_ptr,
    X, Y, NX, NY, H, O, B, Dk, Dv, scale,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    C: tl.constexpr, BLOCK_V: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    STORE_STATES: tl.constexpr,
):
    """Inter-chunk pass of one (batch, head, orientation) frame and one Dv tile; see the module docstring.
    ``STORE_STATES``: also write every chunk's input borders ``L, U`` to ``[B·H·O, NX, NY, Dk, C, Dv]``
    (for the backward)."""
    pid = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    b, h, o, flip_x, flip_y = _frame(pid, O, H)
    C2: tl.constexpr = C * C

    offs_a = tl.arange(0, C)
    offs_n = tl.arange(0, C2)
    offs_v, mask_v = block_range(pid_v * BLOCK_V, Dv, BLOCK_V)
    tile = offs_a[:, None] * Dv + offs_v[None, :]  # [C, BLOCK_V] inside one (d) state slice
    tile_mask = (offs_a[:, None] < C) & mask_v[None, :]
    q_base = q_ptr + b * s_qb + h * s_qh
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    rows_base = rows_ptr + pid * 2 * NY * Dk * C * Dv
    ucar_base = ucar_ptr + pid * 2 * Dk * C * Dv
    out_base = out_ptr + (o * B + b) * X * Y * H * Dv + h * Dv

    for cx in range(NX):
        for cy in range(NY):
            tok, valid = _chunk_tokens(cx, cy, X, Y, flip_x, flip_y, C)
            vv = load_tile(v_base, tok, valid, s_vn, offs_v, mask_v, s_vd).to(tl.float32)
            chunk = (pid * NX + cx) * NY + cy
            sq = chunk * C * C + offs_a[:, None] * C + offs_a[None, :]  # [C, C]
            trl = tl.load(trl_ptr + sq)
            tru = tl.load(tru_ptr + sq)
            tdl = tl.load(tdl_ptr + sq)
            tdu = tl.load(tdu_ptr + sq)
            s_off = chunk * C * C2 + offs_a[:, None] * C2 + offs_n[None, :]  # [C, C²]
            sr = tl.load(sr_ptr + s_off)
            sd = tl.load(sd_ptr + s_off)
            m_off = chunk * C2 * C + offs_n[:, None] * C + offs_a[None, :]  # [C², C]
            ml = tl.load(ml_ptr + m_off)
            mu = tl.load(mu_ptr + m_off)
            acc = tl.zeros((C2, BLOCK_V), dtype=tl.float32)
            rd, wr, ud, uw = _border_slots(cx, cy, NY, Dk, C, Dv)  # read: written by chunks (cx - 1, cy), (cx, cy - 1)
            for d in range(Dk):
                qd = tl.load(q_base + tok * s_qn + d * s_qd, mask=valid, other=0.0).to(tl.float32)
                kd = tl.load(k_base + tok * s_kn + d * s_kd, mask=valid, other=0.0).to(tl.float32)
                left = tl.load(rows_base + rd + d * C * Dv + tile, mask=tile_mask & (cx > 0), other=0.0)
                top = tl.load(ucar_base + ud + d * C * Dv + tile, mask=tile_mask & (cy > 0), other=0.0)
                if STORE_STATES:
                    st = (chunk * Dk + d) * C * Dv + tile
                    tl.store(lbuf_ptr + st, left, mask=tile_mask)
                    tl.store(ubuf_ptr + st, top, mask=tile_mask)
                kv = kd[:, None] * vv
                right = _mm(trl, left, DOT, PRECISION) + _mm(tru, top, DOT, PRECISION) + _mm(sr, kv, DOT, PRECISION)
                bottom = _mm(tdl, left, DOT, PRECISION) + _mm(tdu, top, DOT, PRECISION) + _mm(sd, kv, DOT, PRECISION)
                acc += qd[:, None] * (_mm(ml, left, DOT, PRECISION) + _mm(mu, top, DOT, PRECISION))
                tl.store(rows_base + wr + d * C * Dv + tile, right, mask=tile_mask)
                tl.store(ucar_base + uw + d * C * Dv + tile, bottom, mask=tile_mask)
            tl.store(
                out_base + tok[:, None] * H * Dv + offs_v[None, :], acc * scale, mask=valid[:, None] & mask_v[None, :]
            )
            tl.debug_barrier()  # this chunk's borders are read by the next chunks' threads


@triton.jit(do_not_specialize=["X", "Y", "NX", "NY"])
def _plstm_intra_fwd(
    q_ptr, k_ptr, v_ptr, g_ptr, out_ptr,
    X, Y, NX, NY, H, O, B, Dk, Dv, scale,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """``out[rows] += s·(G ⊙ Q Kᵀ)[rows] V`` for one chunk, one block of target rows, one Dv tile."""
    pid = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    pid_v = tl.program_id(2)
    C2: tl.constexpr = C * C
    frame, chunk, cx, cy, b, h, o, flip_x, flip_y = _chunk_of(pid, NX, NY, O, H)

    tok, valid = _chunk_tokens(cx, cy, X, Y, flip_x, flip_y, C)  # all C² source nodes
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # target rows (local node index)
    tok_r, valid_r = _node_tokens(offs_r, cx, cy, X, Y, flip_x, flip_y, C)
    offs_n = tl.arange(0, C2)
    offs_v, mask_v = block_range(pid_v * BLOCK_V, Dv, BLOCK_V)
    q_base = q_ptr + b * s_qb + h * s_qh
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh

    s = tl.zeros((BLOCK_R, C2), dtype=tl.float32)
    for k0 in range(0, Dk, BLOCK_K):
        offs_k, mask_k = block_range(k0, Dk, BLOCK_K)
        qq = load_tile(q_base, tok_r, valid_r, s_qn, offs_k, mask_k, s_qd).to(tl.float32)
        kk = load_tile(k_base, tok, valid, s_kn, offs_k, mask_k, s_kd).to(tl.float32)
        s += _mm(qq, tl.trans(kk), DOT, PRECISION)
    gg = tl.load(g_ptr + (frame * NX * NY + chunk) * C2 * C2 + offs_r[:, None] * C2 + offs_n[None, :])
    vv = load_tile(v_base, tok, valid, s_vn, offs_v, mask_v, s_vd).to(tl.float32)
    res = _mm(gg * s, vv, DOT, PRECISION) * scale
    out_ptrs = out_ptr + (o * B + b) * X * Y * H * Dv + h * Dv + tok_r[:, None] * H * Dv + offs_v[None, :]
    _accumulate(out_ptrs, valid_r[:, None] & mask_v[None, :], res)


@triton.jit(do_not_specialize=["X", "Y", "NX", "NY"])
def _plstm_scan_bwd(
    q_ptr, k_ptr, v_ptr, do_ptr,
    trl_ptr, tru_ptr, tdl_ptr, tdu_ptr, sr_ptr, sd_ptr, ml_ptr, mu_ptr,
    lbuf_ptr, ubuf_ptr, rows_ptr, ucar_ptr,
    dq_ptr, dk_ptr, dv_ptr,
    dtrl_ptr, dtru_ptr, dtdl_ptr, dtdu_ptr, dsr_ptr, dsd_ptr, dml_ptr, dmu_ptr,
    X, Y, NX, NY, H, O, B, Dk, Dv, scale,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    C: tl.constexpr, BLOCK_V: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Reverse pass of one frame (all of Dv): adjoint borders flow from the last chunk back to the first.

    With ``P = s·q_d dO``: ``dL = trlᵀ dR + tdlᵀ dB + mlᵀ P``, ``dU = truᵀ dR + tduᵀ dB + muᵀ P``,
    ``d(k_d v) = srᵀ dR + sdᵀ dB``; matrix gradients are the outer products with the stored forward
    borders (``dtrl = Σ_d dR Lᵀ`` …). dq, dk, dv go to per-orientation fp32 buffers ``[O, B, N, H, D]``.
    """
    pid = tl.program_id(0).to(tl.int64)
    b, h, o, flip_x, flip_y = _frame(pid, O, H)
    C2: tl.constexpr = C * C

    offs_a = tl.arange(0, C)
    offs_n = tl.arange(0, C2)
    offs_v, mask_v = block_range(0, Dv, BLOCK_V)
    tile = offs_a[:, None] * Dv + offs_v[None, :]
    tile_mask = (offs_a[:, None] < C) & mask_v[None, :]
    q_base = q_ptr + b * s_qb + h * s_qh
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    rows_base = rows_ptr + pid * 2 * NY * Dk * C * Dv
    ucar_base = ucar_ptr + pid * 2 * Dk * C * Dv
    do_base = do_ptr + (b * X * Y * H + h) * Dv
    grad_base = (o * B + b) * X * Y * H + h  # token-major offset into the [O, B, N, H, ·] buffers

    for rx in range(NX):
        cx = NX - 1 - rx
        for ry in range(NY):
            cy = NY - 1 - ry
            tok, valid = _chunk_tokens(cx, cy, X, Y, flip_x, flip_y, C)
            vmask = valid[:, None] & mask_v[None, :]
            vv = load_tile(v_base, tok, valid, s_vn, offs_v, mask_v, s_vd).to(tl.float32)
            dout = tl.load(do_base + tok[:, None] * H * Dv + offs_v[None, :], mask=vmask, other=0.0) * scale
            chunk = (pid * NX + cx) * NY + cy
            sq = chunk * C * C + offs_a[:, None] * C + offs_a[None, :]
            sq_t = chunk * C * C + offs_a[None, :] * C + offs_a[:, None]  # transposed view
            trl_t = tl.load(trl_ptr + sq_t)
            tru_t = tl.load(tru_ptr + sq_t)
            tdl_t = tl.load(tdl_ptr + sq_t)
            tdu_t = tl.load(tdu_ptr + sq_t)
            s_off = chunk * C * C2 + offs_a[:, None] * C2 + offs_n[None, :]  # [C, C²]
            s_off_t = chunk * C * C2 + offs_a[None, :] * C2 + offs_n[:, None]  # [C², C] = transposed
            sr_t = tl.load(sr_ptr + s_off_t)
            sd_t = tl.load(sd_ptr + s_off_t)
            m_off = chunk * C2 * C + offs_n[:, None] * C + offs_a[None, :]  # [C², C]
            m_off_t = chunk * C2 * C + offs_n[None, :] * C + offs_a[:, None]  # [C, C²]
            ml = tl.load(ml_ptr + m_off)
            mu = tl.load(mu_ptr + m_off)
            ml_t = tl.load(ml_ptr + m_off_t)
            mu_t = tl.load(mu_ptr + m_off_t)
            g_trl = tl.zeros((C, C), dtype=tl.float32)
            g_tru = tl.zeros((C, C), dtype=tl.float32)
            g_tdl = tl.zeros((C, C), dtype=tl.float32)
            g_tdu = tl.zeros((C, C), dtype=tl.float32)
            g_sr = tl.zeros((C, C2), dtype=tl.float32)
            g_sd = tl.zeros((C, C2), dtype=tl.float32)
            g_ml = tl.zeros((C2, C), dtype=tl.float32)
            g_mu = tl.zeros((C2, C), dtype=tl.float32)
            dv_acc = tl.zeros((C2, BLOCK_V), dtype=tl.float32)
            rd, wr, ud, uw = _border_slots(cx, cy, NY, Dk, C, Dv)  # read: written by chunks (cx + 1, cy), (cx, cy + 1)
            for d in range(Dk):
                qd = tl.load(q_base + tok * s_qn + d * s_qd, mask=valid, other=0.0).to(tl.float32)
                kd = tl.load(k_base + tok * s_kn + d * s_kd, mask=valid, other=0.0).to(tl.float32)
                st = (chunk * Dk + d) * C * Dv + tile
                left = tl.load(lbuf_ptr + st, mask=tile_mask, other=0.0)
                top = tl.load(ubuf_ptr + st, mask=tile_mask, other=0.0)
                d_right = tl.load(rows_base + rd + d * C * Dv + tile, mask=tile_mask & (cx < NX - 1), other=0.0)
                d_bottom = tl.load(ucar_base + ud + d * C * Dv + tile, mask=tile_mask & (cy < NY - 1), other=0.0)
                p = qd[:, None] * dout
                d_left = _mm(trl_t, d_right, DOT, PRECISION) + _mm(tdl_t, d_bottom, DOT, PRECISION) \
                    + _mm(ml_t, p, DOT, PRECISION)
                d_top = _mm(tru_t, d_right, DOT, PRECISION) + _mm(tdu_t, d_bottom, DOT, PRECISION) \
                    + _mm(mu_t, p, DOT, PRECISION)
                w = _mm(sr_t, d_right, DOT, PRECISION) + _mm(sd_t, d_bottom, DOT, PRECISION)  # d(k_d v) [C², BV]
                read = _mm(ml, left, DOT, PRECISION) + _mm(mu, top, DOT, PRECISION)
                kv = kd[:, None] * vv
                tl.store(dq_ptr + (grad_base + tok * H) * Dk + d, tl.sum(dout * read, axis=1), mask=valid)
                tl.store(dk_ptr + (grad_base + tok * H) * Dk + d, tl.sum(w * vv, axis=1), mask=valid)
                dv_acc += kd[:, None] * w
                left_t = tl.trans(left)
                top_t = tl.trans(top)
                g_trl += _mm(d_right, left_t, DOT, PRECISION)
                g_tru += _mm(d_right, top_t, DOT, PRECISION)
                g_tdl += _mm(d_bottom, left_t, DOT, PRECISION)
                g_tdu += _mm(d_bottom, top_t, DOT, PRECISION)
                kv_t = tl.trans(kv)
                g_sr += _mm(d_right, kv_t, DOT, PRECISION)
                g_sd += _mm(d_bottom, kv_t, DOT, PRECISION)
                g_ml += _mm(p, left_t, DOT, PRECISION)
                g_mu += _mm(p, top_t, DOT, PRECISION)
                tl.store(rows_base + wr + d * C * Dv + tile, d_left, mask=tile_mask)
                tl.store(ucar_base + uw + d * C * Dv + tile, d_top, mask=tile_mask)
            tl.store(dv_ptr + (grad_base + tok[:, None] * H) * Dv + offs_v[None, :], dv_acc, mask=vmask)
            tl.store(dtrl_ptr + sq, g_trl)
            tl.store(dtru_ptr + sq, g_tru)
            tl.store(dtdl_ptr + sq, g_tdl)
            tl.store(dtdu_ptr + sq, g_tdu)
            tl.store(dsr_ptr + s_off, g_sr)
            tl.store(dsd_ptr + s_off, g_sd)
            tl.store(dml_ptr + m_off, g_ml)
            tl.store(dmu_ptr + m_off, g_mu)
            tl.debug_barrier()


@triton.jit(do_not_specialize=["X", "Y", "NX", "NY"])
def _plstm_intra_bwd(
    q_ptr, k_ptr, v_ptr, do_ptr, g_ptr,
    dq_ptr, dk_ptr, dv_ptr, dg_ptr,
    X, Y, NX, NY, H, O, B, Dk, Dv, scale,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_kn, s_kh, s_kd,
    s_vb, s_vn, s_vh, s_vd,
    C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Intra-chunk backward of one chunk (rows in blocks): with ``A = s·dO Vᵀ``, ``dG = A ⊙ Q Kᵀ``,
    ``dQ += (A ⊙ G) K``, ``dK += (A ⊙ G)ᵀ Q``, ``dV += s·(G ⊙ Q Kᵀ)ᵀ dO``; adds into the per-orientation
    buffers written by :func:`_plstm_scan_bwd`."""
    pid = tl.program_id(0).to(tl.int64)
    C2: tl.constexpr = C * C
    frame, chunk, cx, cy, b, h, o, flip_x, flip_y = _chunk_of(pid, NX, NY, O, H)

    tok, valid = _chunk_tokens(cx, cy, X, Y, flip_x, flip_y, C)
    offs_n = tl.arange(0, C2)
    offs_k, mask_k = block_range(0, Dk, BLOCK_K)
    offs_v, mask_v = block_range(0, Dv, BLOCK_V)
    q_base = q_ptr + b * s_qb + h * s_qh
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    do_base = do_ptr + (b * X * Y * H + h) * Dv
    grad_base = (o * B + b) * X * Y * H + h
    kmask = valid[:, None] & mask_k[None, :]
    vmask = valid[:, None] & mask_v[None, :]
    kk = load_tile(k_base, tok, valid, s_kn, offs_k, mask_k, s_kd).to(tl.float32)
    vv = load_tile(v_base, tok, valid, s_vn, offs_v, mask_v, s_vd).to(tl.float32)
    dk_acc = tl.zeros((C2, BLOCK_K), dtype=tl.float32)
    dv_acc = tl.zeros((C2, BLOCK_V), dtype=tl.float32)
    g_base = g_ptr + (frame * NX * NY + chunk) * C2 * C2
    dg_base = dg_ptr + (frame * NX * NY + chunk) * C2 * C2
    for r0 in range(0, C2, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        tok_r, valid_r = _node_tokens(offs_r, cx, cy, X, Y, flip_x, flip_y, C)
        qq = load_tile(q_base, tok_r, valid_r, s_qn, offs_k, mask_k, s_qd).to(tl.float32)
        dout = tl.load(
            do_base + tok_r[:, None] * H * Dv + offs_v[None, :], mask=valid_r[:, None] & mask_v[None, :], other=0.0
        ) * scale
        gg = tl.load(g_base + offs_r[:, None] * C2 + offs_n[None, :])
        s = _mm(qq, tl.trans(kk), DOT, PRECISION)  # [BLOCK_R, C²]
        a = _mm(dout, tl.trans(vv), DOT, PRECISION)
        tl.store(dg_base + offs_r[:, None] * C2 + offs_n[None, :], a * s)
        ag = a * gg
        dq_ptrs = dq_ptr + (grad_base + tok_r[:, None] * H) * Dk + offs_k[None, :]
        _accumulate(dq_ptrs, valid_r[:, None] & mask_k[None, :], _mm(ag, kk, DOT, PRECISION))
        dk_acc += _mm(tl.trans(ag), qq, DOT, PRECISION)
        dv_acc += _mm(tl.trans(gg * s), dout, DOT, PRECISION)
    _accumulate(dk_ptr + (grad_base + tok[:, None] * H) * Dk + offs_k[None, :], kmask, dk_acc)
    _accumulate(dv_ptr + (grad_base + tok[:, None] * H) * Dv + offs_v[None, :], vmask, dv_acc)


# ----------------------------------------------------------------------------------------------------------
# launch and autograd
# ----------------------------------------------------------------------------------------------------------


MAX_BWD_DIM = 128  # the Triton backward holds all of Dk and Dv in one program; beyond, it recomputes in PyTorch


class _Plan:
    """Block sizes and flags of one launch configuration."""

    def __init__(self, q: Tensor, v: Tensor, C: int, full_v: bool = False):
        Dk, Dv = q.shape[-1], v.shape[-1]
        self.BLOCK_V = pow2_block(Dv, 2) if full_v else min(64, pow2_block(Dv, 2))
        self.BLOCK_K = min(64, pow2_block(Dk, 2)) if not full_v else pow2_block(Dk, 2)
        C2 = C * C
        self.BLOCK_R = min(C2, 64 if not full_v else 32)
        self.dot = C >= 16 and self.BLOCK_V >= 16  # scan: [C, C], [C, C²], [C², C] by [·, BLOCK_V]
        self.dot_intra = min(self.BLOCK_R, self.BLOCK_K, C2, self.BLOCK_V) >= 16
        self.precision = dot_precision(q.dtype)
        self.n_v = triton.cdiv(Dv, self.BLOCK_V)


def _scan_fwd(q, k, v, cms, hw, O, scale, store_states: bool):
    X, Y = hw
    B, N, H, Dk = q.shape
    Dv = v.shape[-1]
    NX, NY, C = cms[0].shape[3], cms[0].shape[4], cms[0].shape[-1]
    BHO = B * H * O
    dev = q.device
    plan = _Plan(q, v, C)
    out = torch.empty(O, B, N, H, Dv, device=dev, dtype=torch.float32)
    rows = torch.empty(BHO, 2, NY, Dk, C, Dv, device=dev, dtype=torch.float32)
    ucar = torch.empty(BHO, 2, Dk, C, Dv, device=dev, dtype=torch.float32)
    if store_states:
        lbuf = torch.empty(BHO, NX, NY, Dk, C, Dv, device=dev, dtype=torch.float32)
        ubuf = torch.empty_like(lbuf)
    else:
        lbuf = ubuf = rows  # not touched
    strides = (*q.stride(), *k.stride(), *v.stride())
    _plstm_scan_fwd[(BHO, plan.n_v)](
        q, k, v, *cms[:8], rows, ucar, out, lbuf, ubuf,
        X, Y, NX, NY, H, O, B, Dk, Dv, float(scale), *strides,
        C=C, BLOCK_V=plan.BLOCK_V, DOT=plan.dot, PRECISION=plan.precision, STORE_STATES=store_states,
    )
    return out, (lbuf, ubuf) if store_states else None


def chunk_scan_triton(q: Tensor, k: Tensor, v: Tensor, cms: Tuple[Tensor, ...], hw: Tuple[int, int], O: int,
                      scale: float) -> Tensor:
    """Forward of the chunked scan (no direct term): fp32 ``[B, N, H, Dv]``, orientations summed."""
    X, Y = hw
    B, N, H, Dk = q.shape
    Dv = v.shape[-1]
    cms = [t.contiguous() for t in cms]
    NX, NY, C = cms[0].shape[3], cms[0].shape[4], cms[0].shape[-1]
    plan = _Plan(q, v, C)
    out, _ = _scan_fwd(q, k, v, cms, hw, O, scale, store_states=False)
    strides = (*q.stride(), *k.stride(), *v.stride())
    _plstm_intra_fwd[(B * H * O * NX * NY, triton.cdiv(C * C, plan.BLOCK_R), plan.n_v)](
        q, k, v, cms[8], out,
        X, Y, NX, NY, H, O, B, Dk, Dv, float(scale), *strides,
        C=C, BLOCK_R=plan.BLOCK_R, BLOCK_K=plan.BLOCK_K, BLOCK_V=plan.BLOCK_V, DOT=plan.dot_intra,
        PRECISION=plan.precision,
    )
    return out.sum(0)


def chunk_scan_triton_bwd(q, k, v, cms, hw, O, scale, grad_out):
    """Gradients of :func:`chunk_scan_triton` w.r.t. q, k, v (fp32, orientations summed) and the nine
    chunk-matrix tensors. Recomputes the forward borders first (one extra forward scan)."""
    X, Y = hw
    B, N, H, Dk = q.shape
    Dv = v.shape[-1]
    cms = [t.contiguous() for t in cms]
    NX, NY, C = cms[0].shape[3], cms[0].shape[4], cms[0].shape[-1]
    BHO = B * H * O
    dev = q.device
    _, (lbuf, ubuf) = _scan_fwd(q, k, v, cms, hw, O, scale, store_states=True)
    plan = _Plan(q, v, C, full_v=True)
    dout = grad_out.float().contiguous()
    dq = torch.empty(O, B, N, H, Dk, device=dev, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dv = torch.empty(O, B, N, H, Dv, device=dev, dtype=torch.float32)
    dcms = [torch.empty_like(t) for t in cms]
    rows = torch.empty(BHO, 2, NY, Dk, C, Dv, device=dev, dtype=torch.float32)
    ucar = torch.empty(BHO, 2, Dk, C, Dv, device=dev, dtype=torch.float32)
    strides = (*q.stride(), *k.stride(), *v.stride())
    _plstm_scan_bwd[(BHO,)](
        q, k, v, dout, *cms[:8], lbuf, ubuf, rows, ucar, dq, dk, dv, *dcms[:8],
        X, Y, NX, NY, H, O, B, Dk, Dv, float(scale), *strides,
        C=C, BLOCK_V=plan.BLOCK_V, DOT=plan.dot, PRECISION=plan.precision,
    )
    _plstm_intra_bwd[(BHO * NX * NY,)](
        q, k, v, dout, cms[8], dq, dk, dv, dcms[8],
        X, Y, NX, NY, H, O, B, Dk, Dv, float(scale), *strides,
        C=C, BLOCK_R=plan.BLOCK_R, BLOCK_K=plan.BLOCK_K, BLOCK_V=plan.BLOCK_V, DOT=plan.dot_intra,
        PRECISION=plan.precision,
    )
    return dq.sum(0), dk.sum(0), dv.sum(0), dcms


def _chunk_scan_torch(q, k, v, cms, hw, O, scale):
    """The PyTorch twin of :func:`chunk_scan_triton` (the backward for large heads)."""
    from .doubling import CellMatrices

    cm = CellMatrices(*cms)
    C = cm.size
    padded = (cm.trl.shape[3] * C, cm.trl.shape[4] * C)
    qf, kf, vf = (to_frames(t, hw, O, padded, torch.float32) for t in (q, k, v))
    return from_frames(chunk_scan(qf, kf, vf, cm, scale), hw)


class _ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, hw, O, scale, *cms):
        ctx.save_for_backward(q, k, v, *cms)
        ctx.hw, ctx.O, ctx.scale = hw, O, scale
        return chunk_scan_triton(q, k, v, cms, hw, O, scale)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *cms = ctx.saved_tensors
        if max(q.shape[-1], v.shape[-1]) <= MAX_BWD_DIM:
            dq, dk, dv, dcms = chunk_scan_triton_bwd(q, k, v, cms, ctx.hw, ctx.O, ctx.scale, grad_out)
            return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, *dcms)
        needs = ctx.needs_input_grad
        inputs = [q, k, v] + list(cms)
        flags = [needs[0], needs[1], needs[2]] + list(needs[6:])
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(f) for t, f in zip(inputs, flags)]
            out = _chunk_scan_torch(*leaves[:3], tuple(leaves[3:]), ctx.hw, ctx.O, ctx.scale)
            wanted = [t for t, f in zip(leaves, flags) if f]
            grads = torch.autograd.grad(out, wanted, grad_out) if wanted else ()
        it = iter(grads)
        full = [next(it) if f else None for f in flags]
        return (*full[:3], None, None, None, *full[3:])


def plstm2d_triton(q, k, v, s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u, d, hw, scale, chunk_size) -> Tensor:
    """Chunked 2-D pLSTM with the Triton scan; arguments validated, gates ``[B, N, H, O]``. Returns fp32."""
    X, Y = hw
    C = chunk_size
    padded = (-(-X // C) * C, -(-Y // C) * C)
    O = s_r.shape[-1]
    cm = frame_cell_matrices(s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u, hw, padded, C, torch.float32)
    out = _ChunkScan.apply(q, k, v, (X, Y), O, float(scale), *(getattr(cm, f) for f in _CM_FIELDS))
    if d is not None:
        out = out + direct_term(q, k, v, d, scale)
    return out
