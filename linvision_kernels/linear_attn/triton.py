"""Triton forward and backward of bidirectional linear attention over ``[B, N, H, D]``.

Equations: see :func:`linvision.kernels.linear_attn.linear_attention`. With ``c = M`` (``mean``) or 1,
``k̃_j = wk_j k_j``, ``ṽ_j = wv_j v_j``, ``qd``/``kd`` the denominator features (``q``/``k`` by default):

- state  ``S = Σ_j k̃_j ṽ_jᵀ / c``  ``[Dk, Dv]``,  ``z = Σ_j wk_j kd_j / c``  ``[Dd]``,  ``v̄ = Σ_j ṽ_j / c``  ``[Dv]``
- output ``div``: ``o_i = q_i S / (qd_i·z + eps)``;  ``sub``: ``o_i = s q_i S + (1 − s qd_i·z) v̄``;  ``none``: ``o_i = s q_i S``.

Kernel plan
-----------
Forward, two launches (plus a deterministic torch ``.sum(0)`` over a bounded partial buffer):

1. ``_la_state_fwd``, grid ``(B·H, n_split, Dv tiles)``. Each program owns a contiguous range of key blocks
   and one ``[Dk, BLOCK_V]`` tile of S (all of Dk; Dv is tiled so that the fp32 accumulator stays
   ≤ 128×128), and accumulates ``k̃ᵀṽ`` (``tl.dot``), ``z`` (first Dv tile only) and ``v̄`` (``sub`` only)
   in fp32. It writes one fp32 partial per split into ``[n_split, B·H, ·]``; ``torch.sum(0)`` reduces it.
   Chosen over ``tl.atomic_add`` because it is deterministic (bit-identical runs) and needs no zero-fill;
   the partial round trip is kept small by the split rule below.
2. ``_la_out_fwd``, grid ``(B·H, chunks, Dv tiles)``: a program loads its S tile (and z, v̄) once, keeps it
   resident and walks a contiguous chunk of query blocks (:func:`chunk_plan`): reads q (and qd) once,
   forms the normaliser ``qd·z`` in fp32 and writes o in the input dtype.

Backward, the same shape. Saved for backward: the inputs and the fp32 state (S, z, v̄), nothing N-sized.

1. ``_la_query_bwd``, grid ``(B·H, n_split, Dv tiles)``: every program accumulates its fp32 partial
   ``dS = Σ_i q_iᵀ g_i`` tile (``g = dO/den`` for ``div``, ``s·dO`` otherwise) over one split of the queries,
   ``sub`` also ``dv̄ = Σ_i (1 − s qd_i·z) dO_i``. The first Dv-tile program also does the row pass: per token
   ``dq = (dO Sᵀ)/den`` (or ``s dO Sᵀ``), ``dqz`` = ∂L/∂(qd·z) (``−(dO·q S)/den²``, using
   ``dO·(q S) = (dO Sᵀ)·q``, for ``div``; ``−s dO·v̄`` for ``sub``), ``dq += dqz z`` or ``dqd = dqz z``, and the
   partial ``dz = Σ_i dqz_i qd_i``. Nothing is saved from the forward for this (no o, no row statistic).
   Partials ``[n_split, B·H, ·]`` are bounded exactly like the forward's, then ``.sum(0)``.
2. ``_la_key_bwd``, grid ``(B·H, chunks)``, dS (and dz, dv̄) resident when Dv is one tile:
   ``dk̃ = dS ṽ / c``, ``dṽ = (dSᵀ k̃ + dv̄) / c``, ``dk = wk dk̃ (+ wk dz / c when kd is k)``, ``dv = wv dṽ``,
   ``dkd = wk dz / c``, ``dwk = k·dk̃ + kd·dz / c``, ``dwv = v·dṽ`` (weight gradients of shape
   ``[B, M, H]``; autograd reduces them to the shape of an expanded weight view).

B·H is the first grid axis (limit 2³¹−1); splits (≤ 64), chunks and Dv tiles are small. The kernels live in
:mod:`.triton_forward` and :mod:`.triton_backward`; this module plans the launches and holds the
``autograd.Function``.

Feature maps (``feature_map`` ``"relu"`` / ``"elu+1"`` and ``feature_offset``) are fused: every kernel
applies ``φ`` in fp32 to q, k, qd, kd as it loads them (padding re-masked to zero), and the backward
multiplies dq, dqd, dk, dkd by ``φ'`` at the raw values (re-read at the store: a cache hit). So no mapped
copy of Q or K is written or saved.

Split over the sequence
-----------------------
When ``B·H`` is small (one FLUX sample: 24 heads on 132 SMs) the reduction kernels split the sequence into
``n_split`` contiguous ranges (:func:`split_plan`): enough programs for ``PROGRAMS_PER_SM`` per SM, at most
``MAX_SPLITS`` = 64, never more than the number of token blocks, and each split covering at least
``TOKENS_PER_SPLIT_PER_DIM · max(Dk, Dv)`` tokens so that the fp32 partial round trip (``2·Dk·Dv·4`` bytes
per split) stays ≲ 25 % of the K/V bytes that split reads. The partial buffers therefore never grow with N
beyond that fixed cap (:func:`partial_buffer_shapes`).

Memory bound
------------
Bidirectional linear attention does ≈ D/2 FLOP per byte (bf16), far below the ridge point: the speed limit
is moving the bytes. The forward reads Q, K, V (and qd, kd, weights when given) once and writes O once,
plus the O(splits·B·H·Dk·Dv) fp32 partials and one state load per program. The backward reads Q, dO, K, V
once each (the row pass re-reads dO slices it has just loaded, cache hits) and writes each gradient once.
With more than one Dv tile (padded Dk·Dv > 128²) q and k are re-read per tile. Inputs are read through their
strides (``qkv.reshape(B, N, 3, H, D).unbind(2)`` views need no copy); offsets are int64.

Numerics and ``tl.dot``
-----------------------
All ``tl.dot`` operands are fp32 (loaded values are upcast; the state is fp32). fp32 inputs use
``input_precision="ieee"`` (exact to fp32 rounding). fp16/bf16 inputs use ``"tf32"``: their values are
exact in tf32 (10-bit mantissa); only fp32 intermediates (S, dS, dO/den, weighted k̃, ṽ, φ(q), φ(k)) are
rounded to tf32 inside the product, at the fp16 output's own rounding level. fp32 operands also sidestep the interpreter's broken
bf16 ``tl.dot``. Normalisers and all accumulations are fp32, so fp16/bf16 at N = 65,536 cannot overflow.

Limits: ``Dk`` and ``Dd`` ≤ 256 (held whole in a program); ``Dv`` any size (tiled by ``BLOCK_V``).
Block sizes are fixed heuristics (no autotune), so the interpreter needs no benchmark driver.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
from torch import Tensor

from ..triton_support import (
    INTERPRETER_SM_COUNT,
    MAX_HEAD_DIM,
    MAX_SPLITS,
    PROGRAMS_PER_SM,
    TOKENS_PER_SPLIT_PER_DIM,
    SplitPlan,
    check_head_dims,
    chunk_plan,
    dot_precision,
    plan_splits,
    pow2_block,
    sm_count,
    strides,
    sum_splits,
    value_tile,
)
from .triton_backward import _la_key_bwd, _la_query_bwd
from .triton_forward import _la_out_fwd, _la_state_fwd

_MAX_ACC = 128 * 128  # largest fp32 [Dk, BLOCK_V] accumulator tile per program
_NORM_CODES = {"none": 0, "div": 1, "sub": 2}
_FEATURE_MAP_CODES = {None: 0, "relu": 1, "elu+1": 2}


# ----------------------------------------------------------------------------------------------------------
# Launch planning
# ----------------------------------------------------------------------------------------------------------


class TileConfig(NamedTuple):
    """Block sizes shared by the four kernels for one (Dk, Dv, Dd)."""

    block_t: int  # tokens per block
    block_k: int  # Dk, whole, padded to a power of two ≥ 16
    block_v: int  # Dv tile
    block_d: int  # Dd, whole, padded to a power of two ≥ 16
    v_tiles: int
    num_warps: int
    block_t_out: int  # tokens per block of the output kernel (lighter: no accumulator tile)
    row_v: int  # Dv slice of the query-side row pass (dq = dO Sᵀ): only a [Dk, row_v] slice of S is live


def tile_config(dk: int, dv: int, dd: int) -> TileConfig:
    """Fixed block-size heuristics (no autotune). ``tl.dot`` needs every dimension ≥ 16.

    Dk and Dd are held whole; Dv is tiled so that a ``[Dk, BLOCK_V]`` fp32 tile (state accumulator or
    resident state) has at most 128×128 elements, i.e. one tile up to D = 128. Token blocks shrink as D
    grows to keep the fp32 tiles in registers (checked with ``ptxas -v`` for sm_90a, bf16 inputs: no
    spilling for D ≤ 128; some spilling at D = 256, which is supported but not tuned).
    """
    check_head_dims("Dk and Dd", Dk=dk, Dd=dd)
    block_k = pow2_block(dk)
    block_d = pow2_block(dd)
    block_v = value_tile(block_k, dv, _MAX_ACC)
    widest = max(block_k, block_v, block_d)
    if widest <= 32:
        block_t, num_warps = 64, 4 if widest <= 16 else 8
    elif widest <= 64:
        block_t, num_warps = 32, 8
    else:
        block_t, num_warps = 16, 8
    row_v = min(block_v, 32 if block_k <= 64 else 16)
    return TileConfig(
        block_t, block_k, block_v, block_d, triton.cdiv(dv, block_v), num_warps, min(2 * block_t, 64), row_v
    )


def split_plan(seq_len: int, block_t: int, batch_heads: int, v_tiles: int, head_dim: int, sm_count: int) -> SplitPlan:
    """Sequence splits of a reduction kernel (:func:`..triton_support.plan_splits`), each covering at least
    ``TOKENS_PER_SPLIT_PER_DIM · head_dim`` tokens; bounded by ``MAX_SPLITS`` for any N."""
    return plan_splits(seq_len, block_t, batch_heads, v_tiles, sm_count, TOKENS_PER_SPLIT_PER_DIM * max(1, head_dim))


def partial_buffer_shapes(
    seq_len: int, batch: int, heads: int, dk: int, dv: int, dd: int, normalize: str, sms: int
) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the fp32 partial buffers of a reduction over ``seq_len`` tokens (keys in the forward,
    queries in the backward): ``S``/``dS`` ``[splits, B·H, Dk, Dv]``, ``z``/``dz`` ``[splits, B·H, Dd]``,
    ``v̄``/``dv̄`` ``[splits, B·H, Dv]`` (the last two only when the normalisation uses them).
    The forward and the backward allocate exactly these."""
    cfg = tile_config(dk, dv, dd)
    plan = split_plan(seq_len, cfg.block_t, batch * heads, cfg.v_tiles, max(dk, dv), sms)
    bh = batch * heads
    shapes = {"state": (plan.splits, bh, dk, dv)}
    if normalize != "none":
        shapes["z"] = (plan.splits, bh, dd)
    if normalize == "sub":
        shapes["v_bar"] = (plan.splits, bh, dv)
    return shapes


def _partials(seq_len, B, H, Dk, Dv, Dd, normalize, device) -> Tuple[Tensor, Tensor, Tensor, int]:
    """Allocate (uninitialised; the kernels write every element) the partial buffers; dummies when unused."""
    shapes = partial_buffer_shapes(seq_len, B, H, Dk, Dv, Dd, normalize, sm_count(device))
    bufs = {name: torch.empty(shape, dtype=torch.float32, device=device) for name, shape in shapes.items()}
    state = bufs["state"]
    blocks_per_split = triton.cdiv(triton.cdiv(seq_len, tile_config(Dk, Dv, Dd).block_t), state.shape[0])
    return state, bufs.get("z", state), bufs.get("v_bar", state), max(1, blocks_per_split)


def _reduce(part: Tensor, count: int) -> Tensor:
    """Deterministic sum over the split axis, divided by ``c``."""
    out = sum_splits(part)
    return out.div_(count) if count != 1 else out


def _blocks(cfg: TileConfig) -> dict:
    return dict(BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)


# ----------------------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------------------


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_den, k_den, k_weight, v_weight, normalize, mean, eps, scale, feature_map, offset):
        B, N, H, Dk = q.shape
        M, Dv = k.shape[1], v.shape[3]
        has_den = q_den is not None
        Dd = q_den.shape[3] if has_den else Dk
        norm = _NORM_CODES[normalize]
        count = M if mean else 1
        cfg = tile_config(Dk, Dv, Dd)
        precision = dot_precision(q.dtype)
        BH = B * H
        dev = q.device
        kd = k_den if has_den else k
        qd = q_den if has_den else q
        phi = dict(PHI=feature_map is not None or offset != 0.0, FMAP=_FEATURE_MAP_CODES[feature_map])

        # 1. State: fp32 partials over a bounded number of key splits, then a deterministic sum.
        s_part, z_part, vb_part, per_split = _partials(M, B, H, Dk, Dv, Dd, normalize, dev)
        if BH > 0:
            _la_state_fwd[(BH, s_part.shape[0], cfg.v_tiles)](
                k, v, kd, k_weight if k_weight is not None else k, v_weight if v_weight is not None else v,
                s_part, z_part, vb_part,
                M, H, BH, Dk, Dv, Dd, per_split, offset,
                *k.stride(), *v.stride(), *kd.stride(), *strides(k_weight, 3), *strides(v_weight, 3),
                NORM=norm, HAS_DEN=has_den, HAS_WK=k_weight is not None, HAS_WV=v_weight is not None,
                PRECISION=precision, **phi, **_blocks(cfg),
            )
        state = _reduce(s_part, count)  # [B·H, Dk, Dv]
        z = _reduce(z_part, count) if norm else state  # [B·H, Dd]
        v_bar = _reduce(vb_part, count) if norm == 2 else state  # [B·H, Dv]

        # 2. Output: per query token, the state resident in each program.
        out = torch.empty((B, N, H, Dv), dtype=q.dtype, device=dev)
        chunks = chunk_plan(N, cfg.block_t_out, BH, cfg.v_tiles, sm_count(dev))
        if BH > 0 and N > 0:
            _la_out_fwd[(BH, chunks.splits, cfg.v_tiles)](
                q, qd, state, z, v_bar, out,
                N, H, Dk, Dv, Dd, chunks.blocks_per_split, float(eps), float(scale), offset,
                *q.stride(), *qd.stride(), *out.stride(),
                NORM=norm, HAS_DEN=has_den, PRECISION=precision, **phi, **dict(_blocks(cfg), BLOCK_T=cfg.block_t_out),
            )
        ctx.save_for_backward(q, k, v, q_den, k_den, k_weight, v_weight, state, z, v_bar)
        ctx.options = (normalize, count, float(eps), float(scale), cfg, precision, phi, offset)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, q_den, k_den, k_weight, v_weight, state, z, v_bar = ctx.saved_tensors
        normalize, count, eps, scale, cfg, precision, phi, offset = ctx.options
        norm = _NORM_CODES[normalize]
        needs = ctx.needs_input_grad
        has_den = q_den is not None
        B, N, H, Dk = q.shape
        M, Dv = k.shape[1], v.shape[3]
        Dd = q_den.shape[3] if has_den else Dk
        BH = B * H
        dev = q.device

        need_dq = needs[0]
        need_dqd = needs[3] and has_den and norm != 0
        need_dk, need_dv = needs[1], needs[2]
        need_dkd = needs[4] and has_den and norm != 0
        need_dwk = needs[5] and k_weight is not None
        need_dwv = needs[6] and v_weight is not None
        key_side = need_dk or need_dv or need_dkd or need_dwk or need_dwv
        grads = [None] * 13
        if not (need_dq or need_dqd or key_side) or BH == 0:
            return tuple(grads)

        def new_like(t: Tensor) -> Tensor:
            return torch.empty(t.shape, dtype=t.dtype, device=dev)

        # 1. Query side: dq, dqd per token; fp32 partial dS, dz, dv̄ over a bounded number of query splits.
        qd = q_den if has_den else q
        dq = new_like(q) if need_dq else None
        dqd = new_like(q_den) if need_dqd else None
        ds_part, dz_part, dvb_part, per_split = _partials(N, B, H, Dk, Dv, Dd, normalize, dev)
        _la_query_bwd[(BH, ds_part.shape[0], cfg.v_tiles)](
            q, qd, grad_out, state, z, v_bar,
            dq if dq is not None else state, dqd if dqd is not None else state, ds_part, dz_part, dvb_part,
            N, H, BH, Dk, Dv, Dd, per_split, eps, scale, offset,
            *q.stride(), *qd.stride(), *grad_out.stride(), *strides(dq, 4), *strides(dqd, 4),
            NORM=norm, HAS_DEN=has_den, ROW_PASS=need_dq or need_dqd or norm != 0,
            NEED_DQ=need_dq, NEED_DQD=need_dqd, ROW_V=cfg.row_v, PRECISION=precision, **phi, **_blocks(cfg),
        )
        grads[0], grads[3] = dq, dqd

        # 2. Key side: dk, dv, dkd, dwk, dwv per token from dS/c, dz/c, dv̄/c.
        if key_side:
            d_state = _reduce(ds_part, count)
            d_z = _reduce(dz_part, count) if norm else d_state
            d_vb = _reduce(dvb_part, count) if norm == 2 else d_state
            kd = k_den if has_den else k
            dk = new_like(k) if need_dk else None
            dv = new_like(v) if need_dv else None
            dkd = new_like(k_den) if need_dkd else None
            dwk = torch.empty((B, M, H), dtype=k_weight.dtype, device=dev) if need_dwk else None
            dwv = torch.empty((B, M, H), dtype=v_weight.dtype, device=dev) if need_dwv else None
            chunks = chunk_plan(M, cfg.block_t, BH, 1, sm_count(dev))
            _la_key_bwd[(BH, chunks.splits)](
                k, v, kd, k_weight if k_weight is not None else k, v_weight if v_weight is not None else v,
                d_state, d_z, d_vb,
                dk if dk is not None else d_state, dv if dv is not None else d_state,
                dkd if dkd is not None else d_state, dwk if dwk is not None else d_state,
                dwv if dwv is not None else d_state,
                M, H, Dk, Dv, Dd, chunks.blocks_per_split, offset,
                *k.stride(), *v.stride(), *kd.stride(), *strides(k_weight, 3), *strides(v_weight, 3),
                *strides(dk, 4), *strides(dv, 4), *strides(dkd, 4), *strides(dwk, 3), *strides(dwv, 3),
                NORM=norm, HAS_DEN=has_den, HAS_WK=k_weight is not None, HAS_WV=v_weight is not None,
                NEED_DK=need_dk, NEED_DV=need_dv, NEED_DKD=need_dkd, NEED_DWK=need_dwk, NEED_DWV=need_dwv,
                NEED_DKT=need_dk or need_dwk, V_TILES=cfg.v_tiles, PRECISION=precision, **phi, **_blocks(cfg),
            )
            grads[1], grads[2], grads[4], grads[5], grads[6] = dk, dv, dkd, dwk, dwv
        return tuple(grads)


def linear_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_den: Optional[Tensor],
    k_den: Optional[Tensor],
    k_weight: Optional[Tensor],
    v_weight: Optional[Tensor],
    *,
    normalize: str,
    mean: bool,
    eps: float,
    scale: float,
    feature_map: Optional[str] = None,
    feature_offset: float = 0.0,
) -> Tensor:
    """Triton linear attention; arguments already validated by the public function (weights ``[B, M, H]``).

    ``q, k, q_den, k_den`` are raw: the kernels apply ``φ = feature_map + feature_offset`` in fp32 as they
    load them (``None`` and 0: taken as already mapped), and chain gradients through φ at the raw values.
    Differentiable in q, k, v, q_den, k_den, k_weight and v_weight. Raises ``ValueError`` for Dk or Dd > 256.
    """
    if feature_map not in _FEATURE_MAP_CODES:
        raise ValueError(f"unknown feature_map {feature_map!r}; expected one of {tuple(_FEATURE_MAP_CODES)}")
    Dk = q.shape[3]
    Dd = q_den.shape[3] if q_den is not None else Dk
    tile_config(Dk, v.shape[3], Dd)  # raises on unsupported head dims
    if normalize == "none":  # the denominator features play no part
        q_den = k_den = None
    return _LinearAttention.apply(
        q, k, v, q_den, k_den, k_weight, v_weight, normalize, bool(mean), float(eps), float(scale), feature_map,
        float(feature_offset),
    )


__all__ = [
    "linear_attention_triton", "tile_config", "split_plan", "chunk_plan", "partial_buffer_shapes", "sm_count",
    "INTERPRETER_SM_COUNT", "MAX_HEAD_DIM", "MAX_SPLITS", "PROGRAMS_PER_SM",
]
