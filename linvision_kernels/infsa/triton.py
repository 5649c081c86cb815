"""Triton forward and backward of InfSA (pure, quadratic) and Linear-InfSA (pooled), over ``[B, N, H, D]``.

Each kernel computes only the *reductions* of its mechanism; the O(B·H·D) glue between them (divisions
by the normalisers, ρ, the Frobenius square root) stays in PyTorch autograd, so ρ (learnable or not),
``eps`` and the cast to the output dtype need no hand-written gradient. Accumulators are fp32 (fp64 for
fp64 inputs, which the kernels accept so that ``gradcheck`` can run on them).

Linear-InfSA (``s = 1/√d``, ``n_i = s‖q_i‖``)
--------------------------------------------
1. ``_pool_queries_fwd`` grid ``(B·H, splits)``: partial ``Σ_i n_i`` and ``P = Σ_i n_i q_i`` over a range of
   queries. Glue: ``q̄ = s P / (Σ n + eps)``.
2. ``_pool_keys_fwd`` grid ``(B·H, splits)``: with ``r_j = ReLU(s q̄·k_j)``, partial ``Σ_j r_j`` and
   ``U = Σ_j r_j v_j``. Glue: ``pooled = ρ U / (Σ r + eps)``.

Backward, the same two passes in reverse:

2'. ``_pool_keys_bwd`` (given ``dU``, ``dΣr``): ``dr_j = dU·v_j + dΣr``, ``dt_j = dr_j [t_j > 0]``,
    ``dk_j = s dt_j q̄``, ``dv_j = r_j dU`` per key, and the partial ``dq̄ = s Σ_j dt_j k_j``.
1'. ``_pool_queries_bwd`` (given ``dP``, ``dΣn``): ``dq_i = n_i dP + (dP·q_i + dΣn) s q_i / ‖q_i‖`` per
    query (0 for a zero query: upstream's ReLU on the norm has zero gradient there).

Both directions read Q, K, V once and write each gradient once: memory-bound, no ``tl.dot``. Partials
``[splits, B·H, ·]`` (bounded by ``MAX_SPLITS``) are summed by ``torch.sum(0)``: deterministic.

Pure InfSA (``R = ReLU(Q Kᵀ / d)``), flash-style: the N×M matrix is never stored
-------------------------------------------------------------------------------
- ``_pure_fwd`` grid ``(query blocks · B·H)``: ``U = R V`` (fp32, ``[B, N, H, Dv]``) and the partial
  ``Σ R²`` per query block. Glue: ``o = ρ U / (√ΣR² + eps)``, cast to the input dtype.
- ``_pure_bwd_dq`` (query blocks) and ``_pure_bwd_dkv`` (key blocks), given ``dU`` and ``dΣR²``:
  ``dR = dU Vᵀ + 2 dΣR² R``, ``dS = dR [S > 0]``, ``dq = dS K / d``, ``dk = dSᵀ Q / d``, ``dv = Rᵀ dU``.
  Each recomputes ``S`` tile by tile (no N-sized statistic beyond ``U`` is saved). At ``ΣR² = 0`` (all
  scores ≤ 0) the square root's infinite slope is replaced by 0, as ``torch.linalg.vector_norm`` does.

``tl.dot`` operands are fp32 (fp64 for fp64); fp32 uses ``input_precision="ieee"``, fp16/bf16 ``"tf32"``
(their values are exact in tf32). Limits: D and Dv ≤ 256, held whole in a program. No autotune.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_device import (
    block_range,
    flat_head_block,
    load_tile,
    program_head,
    split_blocks,
    store_tile,
    token_block,
    token_range,
)
from ..triton_support import (
    MAX_HEAD_DIM,
    MAX_SPLITS,
    SplitPlan,
    check_head_dims,
    dot_precision,
    plan_splits,
    pow2_block,
    sm_count,
    strides,
)

MIN_TOKENS_PER_SPLIT = 256


# ----------------------------------------------------------------------------------------------------------
# Linear-InfSA kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "blocks_per_split"])
def _pool_queries_fwd(
    q_ptr, e_part, p_part,
    N, H, BH, D, blocks_per_split, scale,
    s_qb, s_qn, s_qh, s_qd,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial Σ n_i and P = Σ n_i q_i over one split of the queries (n_i = s‖q_i‖)."""
    pid_bh, b, h = program_head(0, H)
    pid_s = tl.program_id(1)
    base = q_ptr + b * s_qb + h * s_qh
    offs_d, mask_d = block_range(0, D, BLOCK_D)
    e_acc = tl.zeros((BLOCK_T,), dtype=ACC)
    p_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    first, last = split_blocks(pid_s, blocks_per_split, N, BLOCK_T)
    for blk in range(first, last):
        offs_t, mask_t = token_block(blk, N, BLOCK_T)
        qq = load_tile(base, offs_t, mask_t, s_qn, offs_d, mask_d, s_qd).to(ACC)
        n = tl.sqrt(tl.sum(qq * qq, 1)) * scale
        e_acc += n
        p_acc += tl.sum(n[:, None] * qq, 0)
    part = pid_s.to(tl.int64) * BH + pid_bh
    tl.store(e_part + part, tl.sum(e_acc, 0))
    tl.store(p_part + part * D + offs_d, p_acc, mask=mask_d)


@triton.jit(do_not_specialize=["N", "num_blocks"])
def _pool_queries_bwd(
    q_ptr, dp_ptr, de_ptr, dq_ptr,
    N, H, D, num_blocks, scale,
    s_qb, s_qn, s_qh, s_qd,
    s_gb, s_gn, s_gh, s_gd,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq_i = n_i dP + (dP·q_i + dΣn) s q_i / ‖q_i‖ for one block of queries."""
    pid_bh, b, h, blk, offs_t, mask_t = flat_head_block(num_blocks, H, N, BLOCK_T)
    offs_d, mask_d = block_range(0, D, BLOCK_D)
    qq = load_tile(q_ptr + b * s_qb + h * s_qh, offs_t, mask_t, s_qn, offs_d, mask_d, s_qd)
    qq = qq.to(ACC)
    dp = tl.load(dp_ptr + pid_bh * D + offs_d, mask=mask_d, other=0.0)
    de = tl.load(de_ptr + pid_bh)
    norm = tl.sqrt(tl.sum(qq * qq, 1))
    dn = tl.sum(qq * dp[None, :], 1) + de
    coef = tl.where(norm > 0, dn * scale / tl.where(norm > 0, norm, 1.0), 0.0)
    dq = (norm * scale)[:, None] * dp[None, :] + coef[:, None] * qq
    store_tile(dq_ptr + b * s_gb + h * s_gh, offs_t, mask_t, s_gn, offs_d, mask_d, s_gd, dq)


@triton.jit
def _key_prologue(qbar_ptr, pid_bh, D, Dv, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    """Channel offsets and masks of D and Dv, and the pooled query q̄ of one (batch, head)."""
    offs_d, mask_d = block_range(0, D, BLOCK_D)
    offs_v, mask_v = block_range(0, Dv, BLOCK_V)
    qbar = tl.load(qbar_ptr + pid_bh * D + offs_d, mask=mask_d, other=0.0)
    return offs_d, mask_d, offs_v, mask_v, qbar


@triton.jit(do_not_specialize=["M", "blocks_per_split"])
def _pool_keys_fwd(
    k_ptr, v_ptr, qbar_ptr, z_part, u_part,
    M, H, BH, D, Dv, blocks_per_split, scale,
    s_kb, s_km, s_kh, s_kd,
    s_vb, s_vm, s_vh, s_vd,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Partial Σ r_j and U = Σ r_j v_j over one split of the keys (r_j = ReLU(s q̄·k_j))."""
    pid_bh, b, h = program_head(0, H)
    pid_s = tl.program_id(1)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    offs_d, mask_d, offs_v, mask_v, qbar = _key_prologue(qbar_ptr, pid_bh, D, Dv, BLOCK_D, BLOCK_V)
    z_acc = tl.zeros((BLOCK_T,), dtype=ACC)
    u_acc = tl.zeros((BLOCK_V,), dtype=ACC)
    first, last = split_blocks(pid_s, blocks_per_split, M, BLOCK_T)
    for blk in range(first, last):
        offs_t, mask_t = token_block(blk, M, BLOCK_T)
        kk = load_tile(k_base, offs_t, mask_t, s_km, offs_d, mask_d, s_kd).to(ACC)
        vv = load_tile(v_base, offs_t, mask_t, s_vm, offs_v, mask_v, s_vd).to(ACC)
        r = tl.maximum(tl.sum(kk * qbar[None, :], 1) * scale, 0.0)
        z_acc += r
        u_acc += tl.sum(r[:, None] * vv, 0)
    part = pid_s.to(tl.int64) * BH + pid_bh
    tl.store(z_part + part, tl.sum(z_acc, 0))
    tl.store(u_part + part * Dv + offs_v, u_acc, mask=mask_v)


@triton.jit(do_not_specialize=["M", "blocks_per_split"])
def _pool_keys_bwd(
    k_ptr, v_ptr, qbar_ptr, du_ptr, dz_ptr, dk_ptr, dv_ptr, c_part,
    M, H, BH, D, Dv, blocks_per_split, scale,
    s_kb, s_km, s_kh, s_kd,
    s_vb, s_vm, s_vh, s_vd,
    s_gkb, s_gkm, s_gkh, s_gkd,
    s_gvb, s_gvm, s_gvh, s_gvd,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
):
    """dk, dv per key of one split, and the partial Σ_j dt_j k_j (for dq̄)."""
    pid_bh, b, h = program_head(0, H)
    pid_s = tl.program_id(1)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    offs_d, mask_d, offs_v, mask_v, qbar = _key_prologue(qbar_ptr, pid_bh, D, Dv, BLOCK_D, BLOCK_V)
    du = tl.load(du_ptr + pid_bh * Dv + offs_v, mask=mask_v, other=0.0)
    dz = tl.load(dz_ptr + pid_bh)
    c_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    first, last = split_blocks(pid_s, blocks_per_split, M, BLOCK_T)
    for blk in range(first, last):
        offs_t, mask_t = token_block(blk, M, BLOCK_T)
        kk = load_tile(k_base, offs_t, mask_t, s_km, offs_d, mask_d, s_kd).to(ACC)
        vv = load_tile(v_base, offs_t, mask_t, s_vm, offs_v, mask_v, s_vd).to(ACC)
        t = tl.sum(kk * qbar[None, :], 1) * scale
        dt = tl.where(t > 0, tl.sum(vv * du[None, :], 1) + dz, 0.0)
        dt = tl.where(mask_t, dt, 0.0)
        c_acc += tl.sum(dt[:, None] * kk, 0)
        if NEED_DK:
            dk = (dt * scale)[:, None] * qbar[None, :]
            store_tile(dk_ptr + b * s_gkb + h * s_gkh, offs_t, mask_t, s_gkm, offs_d, mask_d, s_gkd, dk)
        if NEED_DV:
            dv = tl.maximum(t, 0.0)[:, None] * du[None, :]
            store_tile(dv_ptr + b * s_gvb + h * s_gvh, offs_t, mask_t, s_gvm, offs_v, mask_v, s_gvd, dv)
    part = pid_s.to(tl.int64) * BH + pid_bh
    tl.store(c_part + part * D + offs_d, c_acc, mask=mask_d)


# ----------------------------------------------------------------------------------------------------------
# Pure InfSA kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _pure_block(num_blocks, H, n, D, Dv, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    """:func:`flat_head_block`, plus the channel offsets and masks of D and Dv."""
    pid_bh, b, h, blk, offs, mask = flat_head_block(num_blocks, H, n, BLOCK)
    offs_d, mask_d = block_range(0, D, BLOCK_D)
    offs_v, mask_v = block_range(0, Dv, BLOCK_V)
    return b, h, pid_bh, blk, offs, mask, offs_d, mask_d, offs_v, mask_v


@triton.jit
def _load_pair(a_base, b_base, start, n, s_an, s_ad, s_bn, s_bd, offs_d, mask_d, offs_v, mask_v,
               ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Rows ``[start, start + BLOCK)`` of a ``[·, D]`` and a ``[·, Dv]`` tensor (k and v, or q and dU), in ``ACC``."""
    offs, mask = token_range(start, n, BLOCK)
    a = load_tile(a_base, offs, mask, s_an, offs_d, mask_d, s_ad).to(ACC)
    b = load_tile(b_base, offs, mask, s_bn, offs_v, mask_v, s_bd).to(ACC)
    return a, b


@triton.jit(do_not_specialize=["N", "M", "num_blocks"])
def _pure_fwd(
    q_ptr, k_ptr, v_ptr, u_ptr, f2_part,
    N, M, H, D, Dv, num_blocks, inv_d,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_km, s_kh, s_kd,
    s_vb, s_vm, s_vh, s_vd,
    s_ub, s_un, s_uh, s_ud,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """U = ReLU(Q Kᵀ/d) V for one block of queries, and that block's Σ ReLU(·)²."""
    b, h, pid_bh, blk, offs_m, mask_m, offs_d, mask_d, offs_v, mask_v = _pure_block(
        num_blocks, H, N, D, Dv, BLOCK_M, BLOCK_D, BLOCK_V)
    qq = load_tile(q_ptr + b * s_qb + h * s_qh, offs_m, mask_m, s_qn, offs_d, mask_d, s_qd).to(ACC)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=ACC)
    f2 = tl.zeros((BLOCK_M,), dtype=ACC)
    for start in range(0, M, BLOCK_N):
        kk, vv = _load_pair(k_base, v_base, start, M, s_km, s_kd, s_vm, s_vd, offs_d, mask_d, offs_v, mask_v,
                            ACC, BLOCK_N)
        r = tl.maximum(tl.dot(qq, tl.trans(kk), input_precision=PRECISION) * inv_d, 0.0)
        f2 += tl.sum(r * r, 1)
        acc = tl.dot(r, vv, acc, input_precision=PRECISION)
    store_tile(u_ptr + b * s_ub + h * s_uh, offs_m, mask_m, s_un, offs_v, mask_v, s_ud, acc)
    tl.store(f2_part + pid_bh * num_blocks + blk, tl.sum(f2, 0))


@triton.jit(do_not_specialize=["N", "M", "num_blocks"])
def _pure_bwd_dq(
    q_ptr, k_ptr, v_ptr, du_ptr, df2_ptr, dq_ptr,
    N, M, H, D, Dv, num_blocks, inv_d,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_km, s_kh, s_kd,
    s_vb, s_vm, s_vh, s_vd,
    s_ub, s_un, s_uh, s_ud,
    s_gb, s_gn, s_gh, s_gd,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dq = Σ_j dS_ij k_j / d for one block of queries."""
    b, h, pid_bh, blk, offs_m, mask_m, offs_d, mask_d, offs_v, mask_v = _pure_block(
        num_blocks, H, N, D, Dv, BLOCK_M, BLOCK_D, BLOCK_V)
    qq = load_tile(q_ptr + b * s_qb + h * s_qh, offs_m, mask_m, s_qn, offs_d, mask_d, s_qd)
    qq = qq.to(ACC)
    du = load_tile(du_ptr + b * s_ub + h * s_uh, offs_m, mask_m, s_un, offs_v, mask_v, s_ud).to(ACC)
    two_df2 = 2.0 * tl.load(df2_ptr + pid_bh)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    for start in range(0, M, BLOCK_N):
        kk, vv = _load_pair(k_base, v_base, start, M, s_km, s_kd, s_vm, s_vd, offs_d, mask_d, offs_v, mask_v,
                            ACC, BLOCK_N)
        s = tl.dot(qq, tl.trans(kk), input_precision=PRECISION) * inv_d
        dr = tl.dot(du, tl.trans(vv), input_precision=PRECISION) + two_df2 * tl.maximum(s, 0.0)
        ds = tl.where(s > 0, dr, 0.0)
        acc = tl.dot(ds, kk, acc, input_precision=PRECISION)
    store_tile(dq_ptr + b * s_gb + h * s_gh, offs_m, mask_m, s_gn, offs_d, mask_d, s_gd, acc * inv_d)


@triton.jit(do_not_specialize=["N", "M", "num_blocks"])
def _pure_bwd_dkv(
    q_ptr, k_ptr, v_ptr, du_ptr, df2_ptr, dk_ptr, dv_ptr,
    N, M, H, D, Dv, num_blocks, inv_d,
    s_qb, s_qn, s_qh, s_qd,
    s_kb, s_km, s_kh, s_kd,
    s_vb, s_vm, s_vh, s_vd,
    s_ub, s_un, s_uh, s_ud,
    s_gkb, s_gkm, s_gkh, s_gkd,
    s_gvb, s_gvm, s_gvh, s_gvd,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
):
    """dk = Σ_i dS_ij q_i / d and dv = Σ_i R_ij dU_i for one block of keys."""
    b, h, pid_bh, blk, offs_n, mask_n, offs_d, mask_d, offs_v, mask_v = _pure_block(
        num_blocks, H, M, D, Dv, BLOCK_N, BLOCK_D, BLOCK_V)
    kk = load_tile(k_ptr + b * s_kb + h * s_kh, offs_n, mask_n, s_km, offs_d, mask_d, s_kd)
    kk = kk.to(ACC)
    vv = load_tile(v_ptr + b * s_vb + h * s_vh, offs_n, mask_n, s_vm, offs_v, mask_v, s_vd)
    vv = vv.to(ACC)
    two_df2 = 2.0 * tl.load(df2_ptr + pid_bh)
    q_base = q_ptr + b * s_qb + h * s_qh
    u_base = du_ptr + b * s_ub + h * s_uh
    dk_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    dv_acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    for start in range(0, N, BLOCK_M):
        qq, du = _load_pair(q_base, u_base, start, N, s_qn, s_qd, s_un, s_ud, offs_d, mask_d, offs_v, mask_v,
                            ACC, BLOCK_M)
        st = tl.dot(kk, tl.trans(qq), input_precision=PRECISION) * inv_d  # Sᵀ: [BLOCK_N, BLOCK_M]
        rt = tl.maximum(st, 0.0)
        if NEED_DV:
            dv_acc = tl.dot(rt, du, dv_acc, input_precision=PRECISION)
        if NEED_DK:
            drt = tl.dot(vv, tl.trans(du), input_precision=PRECISION) + two_df2 * rt
            dst = tl.where(st > 0, drt, 0.0)
            dk_acc = tl.dot(dst, qq, dk_acc, input_precision=PRECISION)
    if NEED_DK:
        store_tile(dk_ptr + b * s_gkb + h * s_gkh, offs_n, mask_n, s_gkm, offs_d, mask_d, s_gkd, dk_acc * inv_d)
    if NEED_DV:
        store_tile(dv_ptr + b * s_gvb + h * s_gvh, offs_n, mask_n, s_gvm, offs_v, mask_v, s_gvd, dv_acc)


# ----------------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------------


def split_plan(seq_len: int, block_t: int, batch_heads: int, device: torch.device) -> SplitPlan:
    """Sequence splits of a reduction kernel: enough programs to fill the GPU, at most ``MAX_SPLITS``,
    each covering at least ``MIN_TOKENS_PER_SPLIT`` tokens, and never an empty split."""
    return plan_splits(seq_len, block_t, batch_heads, 1, sm_count(device), MIN_TOKENS_PER_SPLIT)


def _acc_types(t: Tensor) -> Tuple[torch.dtype, "tl.dtype", str]:
    """Accumulation dtype (torch and Triton; fp64 for fp64 inputs, else fp32) and the ``tl.dot`` precision."""
    if t.dtype == torch.float64:
        return torch.float64, tl.float64, dot_precision(t.dtype)
    return torch.float32, tl.float32, dot_precision(t.dtype)


def _token_block(*dims: int) -> int:
    return 64 if max(pow2_block(d) for d in dims) <= 64 else 32


# ----------------------------------------------------------------------------------------------------------
# autograd.Functions: the reductions; the glue is plain torch autograd in the public functions below
# ----------------------------------------------------------------------------------------------------------


class _PoolQueries(torch.autograd.Function):
    """q [B, N, H, D] → (Σ_i n_i [B·H], P = Σ_i n_i q_i [B·H, D]) in the accumulation dtype."""

    @staticmethod
    def forward(ctx, q):
        B, N, H, D = q.shape
        BH = B * H
        acc_t, acc_tl, _ = _acc_types(q)
        block_t, block_d = _token_block(D), pow2_block(D)
        plan = split_plan(N, block_t, BH, q.device)
        e_part = torch.empty((plan.splits, BH), dtype=acc_t, device=q.device)
        p_part = torch.empty((plan.splits, BH, D), dtype=acc_t, device=q.device)
        _pool_queries_fwd[(BH, plan.splits)](
            q, e_part, p_part, N, H, BH, D, plan.blocks_per_split, D**-0.5, *q.stride(),
            ACC=acc_tl, BLOCK_T=block_t, BLOCK_D=block_d,
        )
        ctx.save_for_backward(q)
        return e_part.sum(0), p_part.sum(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_e, d_p):
        (q,) = ctx.saved_tensors
        B, N, H, D = q.shape
        BH = B * H
        acc_t, acc_tl, _ = _acc_types(q)
        d_e = torch.zeros(BH, dtype=acc_t, device=q.device) if d_e is None else d_e.to(acc_t).contiguous()
        d_p = torch.zeros(BH, D, dtype=acc_t, device=q.device) if d_p is None else d_p.to(acc_t).contiguous()
        dq = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device)
        block_t = _token_block(D)
        n_blocks = triton.cdiv(N, block_t)
        _pool_queries_bwd[(BH * n_blocks,)](
            q, d_p, d_e, dq, N, H, D, n_blocks, D**-0.5, *q.stride(), *dq.stride(),
            ACC=acc_tl, BLOCK_T=block_t, BLOCK_D=pow2_block(D),
        )
        return dq


class _PoolKeys(torch.autograd.Function):
    """(k [B, M, H, D], v [B, M, H, Dv], q̄ [B·H, D]) → (Σ_j r_j [B·H], U = Σ_j r_j v_j [B·H, Dv])."""

    @staticmethod
    def forward(ctx, k, v, q_bar):
        B, M, H, D = k.shape
        Dv = v.shape[3]
        BH = B * H
        acc_t, acc_tl, _ = _acc_types(k)
        q_bar = q_bar.contiguous()
        block_t = _token_block(D, Dv)
        plan = split_plan(M, block_t, BH, k.device)
        z_part = torch.empty((plan.splits, BH), dtype=acc_t, device=k.device)
        u_part = torch.empty((plan.splits, BH, Dv), dtype=acc_t, device=k.device)
        _pool_keys_fwd[(BH, plan.splits)](
            k, v, q_bar, z_part, u_part, M, H, BH, D, Dv, plan.blocks_per_split, D**-0.5, *k.stride(), *v.stride(),
            ACC=acc_tl, BLOCK_T=block_t, BLOCK_D=pow2_block(D), BLOCK_V=pow2_block(Dv),
        )
        ctx.save_for_backward(k, v, q_bar)
        return z_part.sum(0), u_part.sum(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_z, d_u):
        k, v, q_bar = ctx.saved_tensors
        B, M, H, D = k.shape
        Dv = v.shape[3]
        BH = B * H
        acc_t, acc_tl, _ = _acc_types(k)
        d_z = torch.zeros(BH, dtype=acc_t, device=k.device) if d_z is None else d_z.to(acc_t).contiguous()
        d_u = torch.zeros(BH, Dv, dtype=acc_t, device=k.device) if d_u is None else d_u.to(acc_t).contiguous()
        need_dk, need_dv, _ = ctx.needs_input_grad
        dk = torch.empty((B, M, H, D), dtype=k.dtype, device=k.device) if need_dk else None
        dv = torch.empty((B, M, H, Dv), dtype=v.dtype, device=v.device) if need_dv else None
        block_t = _token_block(D, Dv)
        plan = split_plan(M, block_t, BH, k.device)
        c_part = torch.empty((plan.splits, BH, D), dtype=acc_t, device=k.device)
        _pool_keys_bwd[(BH, plan.splits)](
            k, v, q_bar, d_u, d_z, dk if need_dk else c_part, dv if need_dv else c_part, c_part,
            M, H, BH, D, Dv, plan.blocks_per_split, D**-0.5,
            *k.stride(), *v.stride(), *strides(dk, 4), *strides(dv, 4),
            ACC=acc_tl, BLOCK_T=block_t, BLOCK_D=pow2_block(D), BLOCK_V=pow2_block(Dv),
            NEED_DK=need_dk, NEED_DV=need_dv,
        )
        d_qbar = c_part.sum(0) * D**-0.5
        return dk, dv, d_qbar


class _PureInfSA(torch.autograd.Function):
    """(q, k, v) → (U = ReLU(QKᵀ/d) V [B, N, H, Dv], Σ ReLU(QKᵀ/d)² [B·H]) in the accumulation dtype."""

    @staticmethod
    def forward(ctx, q, k, v):
        B, N, H, D = q.shape
        M, Dv = k.shape[1], v.shape[3]
        BH = B * H
        acc_t, acc_tl, precision = _acc_types(q)
        block = _token_block(D, Dv)
        n_blocks = triton.cdiv(N, block)
        u = torch.empty((B, N, H, Dv), dtype=acc_t, device=q.device)
        f2_part = torch.empty((BH, n_blocks), dtype=acc_t, device=q.device)
        _pure_fwd[(BH * n_blocks,)](
            q, k, v, u, f2_part, N, M, H, D, Dv, n_blocks, 1.0 / D,
            *q.stride(), *k.stride(), *v.stride(), *u.stride(),
            ACC=acc_tl, PRECISION=precision, BLOCK_M=block, BLOCK_N=block,
            BLOCK_D=pow2_block(D), BLOCK_V=pow2_block(Dv),
        )
        f2 = f2_part.sum(1)
        ctx.save_for_backward(q, k, v, f2)
        return u, f2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_u, d_f2):
        q, k, v, f2 = ctx.saved_tensors
        B, N, H, D = q.shape
        M, Dv = k.shape[1], v.shape[3]
        BH = B * H
        acc_t, acc_tl, precision = _acc_types(q)
        if d_u is None:
            d_u = torch.zeros((B, N, H, Dv), dtype=acc_t, device=q.device)
        d_f2 = torch.zeros(BH, dtype=acc_t, device=q.device) if d_f2 is None else d_f2.to(acc_t)
        # At ΣR² = 0 every R is 0; the glue's √ has an infinite slope there that multiplies R = 0.
        d_f2 = torch.where(f2 > 0, d_f2, torch.zeros_like(d_f2)).contiguous()
        need_dq, need_dk, need_dv = ctx.needs_input_grad
        block = _token_block(D, Dv)
        consts = dict(ACC=acc_tl, PRECISION=precision, BLOCK_M=block, BLOCK_N=block,
                      BLOCK_D=pow2_block(D), BLOCK_V=pow2_block(Dv))
        dq = dk = dv = None
        if need_dq:
            dq = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device)
            n_blocks = triton.cdiv(N, block)
            _pure_bwd_dq[(BH * n_blocks,)](
                q, k, v, d_u, d_f2, dq, N, M, H, D, Dv, n_blocks, 1.0 / D,
                *q.stride(), *k.stride(), *v.stride(), *d_u.stride(), *dq.stride(), **consts,
            )
        if need_dk or need_dv:
            dk = torch.empty((B, M, H, D), dtype=k.dtype, device=k.device) if need_dk else None
            dv = torch.empty((B, M, H, Dv), dtype=v.dtype, device=v.device) if need_dv else None
            m_blocks = triton.cdiv(M, block)
            _pure_bwd_dkv[(BH * m_blocks,)](
                q, k, v, d_u, d_f2, dk if need_dk else d_f2, dv if need_dv else d_f2,
                N, M, H, D, Dv, m_blocks, 1.0 / D,
                *q.stride(), *k.stride(), *v.stride(), *d_u.stride(),
                *strides(dk, 4), *strides(dv, 4),
                NEED_DK=need_dk, NEED_DV=need_dv, **consts,
            )
        return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# Public entry points (arguments validated by the package's public functions)
# ----------------------------------------------------------------------------------------------------------


def linear_infsa_pooled_triton(q: Tensor, k: Tensor, v: Tensor, rho, eps: float) -> Tensor:
    """``ρ U / (Σr + eps)`` per (batch, head): ``[B, H, Dv]`` in the input dtype; differentiable in q, k, v, ρ."""
    B, _, H, D = q.shape
    check_head_dims("head dims", D=D, Dv=v.shape[3])
    e_sum, p = _PoolQueries.apply(q)
    q_bar = p * (D**-0.5) / (e_sum + eps).unsqueeze(-1)
    z_sum, u = _PoolKeys.apply(k, v, q_bar)
    acc = u.dtype
    rho = rho.to(acc) if isinstance(rho, Tensor) else rho
    pooled = rho * u / (z_sum + eps).unsqueeze(-1)
    return pooled.view(B, H, -1).to(q.dtype)


def pure_infsa_triton(q: Tensor, k: Tensor, v: Tensor, rho, eps: float) -> Tensor:
    """``ρ U / (√ΣR² + eps)`` as ``[B, N, H, Dv]`` in the input dtype; differentiable in q, k, v, ρ."""
    B, _, H, D = q.shape
    check_head_dims("head dims", D=D, Dv=v.shape[3])
    u, f2 = _PureInfSA.apply(q, k, v)
    rho = rho.to(u.dtype) if isinstance(rho, Tensor) else rho
    coef = rho / (torch.sqrt(f2) + eps)  # [B·H]
    return (u * coef.view(B, 1, H, 1)).to(q.dtype)


__all__ = [
    "MAX_HEAD_DIM",
    "MAX_SPLITS",
    "MIN_TOKENS_PER_SPLIT",
    "linear_infsa_pooled_triton",
    "pure_infsa_triton",
    "split_plan",
]
