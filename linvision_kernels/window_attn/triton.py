"""Triton forward and backward of circular-window attention (CLEAR) over ``[B, N, H, D]``.

Operator: see :func:`linvision.kernels.window_attn.window_attention`. ``N = T + h·w`` tokens, prefix
first; pooled keys/values ``[B, P, H, D]``. ``r²`` integer test ``dy² + dx² < r²``.

Kernel plan
-----------
Flash-attention style: online softmax in fp32 (base-2 exponent, ``qk_scale = scale·log2 e``), the output
normalised once at the end, the row log-sum-exp ``lse`` (fp32, ``[B·H, N]``) kept for the backward.

Forward, two launches:

1. ``_wa_queries`` (``BWD=False``) on image queries, grid ``(query tiles, B·H)``. A query tile is a 2-D
   patch of ``QH×QW`` image tokens (gathered through their raster indices). It visits, in this order,
   all prefix keys (blocks of ``BLOCK_N``), the image-key patches of ``KH×KW`` tokens that can meet the
   disc of some query of the patch (row tiles × per-row column reach, see ``tiles.py``; about
   ``(QH + 2r)(QW + 2r) / (KH·KW)`` patches, independent of the image size), and all pooled keys.
   Each key patch is masked per (query, key) pair by the exact disc test and the image bounds.
2. ``_wa_dense_queries`` (``BWD=False``) on prefix queries, grid ``(⌈T/BLOCK_M⌉, B·H)``: dense over the
   ``T + h·w`` prefix and image keys, no pooled keys.

Backward (FA2 scheme), ``δ_i = dO_i·O_i`` first (``_wa_delta``, fp32 ``[B·H, N]``), then
``p = exp2(qk_scale·q·k − lse)``, ``ds = p (dO·v − δ)``:

3. ``_wa_queries`` / ``_wa_dense_queries`` with ``BWD=True``: the same visiting order, accumulating
   ``dq = scale·Σ ds k`` per query tile.
4. ``_wa_image_keys``, grid ``(key tiles, B·H)``: a 2-D key patch gathers ``dk = scale·Σ dsᵀ q`` and
   ``dv = Σ pᵀ dO`` from all prefix queries (dense) and from the image-query patches around it (the
   disc relation is symmetric, so the same row/column-reach geometry applies with the roles swapped).
5. ``_wa_dense_keys``, grid ``(⌈K/BLOCK_N⌉, B·H)``: key blocks seen by a contiguous range of queries
   without a mask: prefix keys (all ``N`` queries) and pooled keys (the ``h·w`` image queries).

Every output element is written by exactly one program (no atomics; deterministic). Kernels 1–3 are in
:mod:`.triton_queries`, 4–5 and ``_wa_delta`` in :mod:`.triton_keys`, the patch geometry they share in
:mod:`.triton_tiles`; this module picks the tiles, launches them and holds the ``autograd.Function``.

Numerics and ``tl.dot``
-----------------------
fp32 inputs: fp32 operands, ``input_precision="ieee"``. fp16 (and bf16 on a GPU): native-dtype operands
with fp32 accumulation, ``p`` and ``ds`` rounded to the input dtype before their products (as in
FlashAttention-2). bf16 under ``TRITON_INTERPRET`` (whose bf16 ``tl.dot`` is wrong): fp32 operands.
Softmax statistics, accumulators, ``lse`` and ``δ`` are fp32. Limits: ``Dk, Dv ≤ 256``.
Inputs are read through their strides; token offsets are int64.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from ..triton_support import MAX_HEAD_DIM, check_head_dims, fp32_dot_operands, interpreting, pow2_block
from .tiles import Tile, default_tiles, reach_table
from .triton_keys import _wa_delta, _wa_dense_keys, _wa_image_keys
from .triton_queries import _wa_dense_queries, _wa_queries

LOG2E = math.log2(math.e)


class Config:
    """Tile shapes and flags for one call (fixed heuristics, no autotune)."""

    def __init__(self, q: Tensor, dk: int, dv: int, tiles: Optional[Tuple[Tile, Tile]]):
        check_head_dims("head dims", Dk=dk, Dv=dv)
        interp = interpreting() or not q.is_cuda
        (self.qh, self.qw), (self.kh, self.kw) = tiles if tiles is not None else default_tiles(interp)
        for a, b in ((self.qh, self.qw), (self.kh, self.kw)):
            n = a * b
            if n < 16 or n & (n - 1):
                raise ValueError(f"tile {a}x{b}: the product must be a power of two >= 16")
        self.block_dk = pow2_block(dk)
        self.block_dv = pow2_block(dv)
        self.block_m = self.qh * self.qw  # dense query blocks as large as a query patch
        self.block_n = self.kh * self.kw  # dense key blocks as large as a key patch
        self.dot_f32 = fp32_dot_operands(q.dtype, interp)
        self.precision = "ieee" if self.dot_f32 else "tf32"  # precision only matters for fp32 operands
        big = max(self.block_m, self.block_n) * max(self.block_dk, self.block_dv) > 64 * 128
        self.num_warps = 8 if big else 4

    def consts(self):
        return dict(BLOCK_DK=self.block_dk, BLOCK_DV=self.block_dv, DOT_F32=self.dot_f32,
                    PRECISION=self.precision, num_warps=self.num_warps)


@functools.lru_cache(maxsize=64)
def _reach(outer_h: int, inner_h: int, radius: int, device: str) -> Tensor:
    """Column reach per row tile (``tiles.reach_table``) as int32 on ``device``; depends on r and tiles only."""
    return torch.tensor(reach_table(outer_h, inner_h, radius), dtype=torch.int32, device=device)


def _query_side(q, k, v, pk, pv, o, lse, do, delta, counts, hw, radius, T, qk_scale, out_scale, cfg: Config,
                bwd: bool, count: bool = False) -> None:
    """Launch the query-side kernels: image-query patches, then the dense prefix queries. Forward (``bwd=False``):
    ``o`` and ``lse`` are written (and the visited-tile ``counts`` with ``count``); backward: ``o`` is dq, from
    ``do`` and ``delta``."""
    B, N, H, Dk = q.shape
    Dv = v.shape[3]
    h, w = hw
    P = pk.shape[1] if pk is not None else 0
    pk, pv = (pk, pv) if pk is not None else (k, v)
    reach = _reach(cfg.qh, cfg.kh, radius, str(q.device))
    n_tiles = triton.cdiv(h, cfg.qh) * triton.cdiv(w, cfg.qw)
    _wa_queries[(n_tiles, B * H)](
        q, k, v, pk, pv, o, lse, do, delta, reach, counts,
        T, h, w, P, N, H, radius, reach.numel(), Dk, Dv, qk_scale, out_scale,
        *q.stride(), *k.stride(), *v.stride(), *pk.stride(), *pv.stride(), *o.stride(), *do.stride(),
        QH=cfg.qh, QW=cfg.qw, KH=cfg.kh, KW=cfg.kw, BLOCK_N=cfg.block_n, BWD=bwd, COUNT=count, **cfg.consts(),
    )
    if T:
        _wa_dense_queries[(triton.cdiv(T, cfg.block_m), B * H)](
            q, k, v, o, lse, do, delta,
            T, N, N, H, Dk, Dv, qk_scale, out_scale,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BWD=bwd, **cfg.consts(),
        )


def _forward(q, k, v, pk, pv, hw, radius, T, scale, cfg: Config, count: bool = False):
    B, N, H, Dk = q.shape
    h, w = hw
    BH = B * H
    dev = q.device
    out = torch.empty((B, N, H, v.shape[3]), dtype=q.dtype, device=dev)
    lse = torch.empty((BH, N), dtype=torch.float32, device=dev)
    n_tiles = triton.cdiv(h, cfg.qh) * triton.cdiv(w, cfg.qw)
    counts = torch.empty((BH, n_tiles), dtype=torch.int32, device=dev) if count else lse
    if BH == 0:
        return out, lse, counts
    _query_side(q, k, v, pk, pv, out, lse, q, lse, counts, hw, radius, T, scale * LOG2E, 1.0, cfg, False, count)
    return out, lse, counts


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, hw, radius, T, scale, cfg):
        out, lse, _ = _forward(q, k, v, pk, pv, hw, radius, T, scale, cfg)
        ctx.save_for_backward(q, k, v, pk, pv, out, lse)
        ctx.options = (hw, radius, T, scale, cfg)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, pk, pv, out, lse = ctx.saved_tensors
        (h, w), radius, T, scale, cfg = ctx.options
        needs = ctx.needs_input_grad
        grads = [None] * 10
        B, N, H, Dk = q.shape
        Dv = v.shape[3]
        BH = B * H
        dev = q.device
        P = pk.shape[1] if pk is not None else 0
        if BH == 0 or not any(needs[:5]):
            return tuple(grads)
        qk_scale = scale * LOG2E
        do = grad_out
        consts = cfg.consts()

        delta = torch.empty((BH, N), dtype=torch.float32, device=dev)
        block_t = 64
        _wa_delta[(triton.cdiv(N, block_t), BH)](
            out, do, delta, N, H, Dv, *out.stride(), *do.stride(),
            BLOCK_T=block_t, BLOCK_DV=cfg.block_dv, num_warps=4,
        )

        if needs[0]:
            dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
            _query_side(q, k, v, pk, pv, dq, lse, do, delta, lse, (h, w), radius, T, qk_scale, scale, cfg, True)
            grads[0] = dq

        if needs[1] or needs[2]:
            dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
            dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
            reach = _reach(cfg.kh, cfg.qh, radius, str(dev))
            n_tiles = triton.cdiv(h, cfg.kh) * triton.cdiv(w, cfg.kw)
            _wa_image_keys[(n_tiles, BH)](
                q, k, v, do, lse, delta, dk, dv, reach,
                T, h, w, N, H, radius, reach.numel(), Dk, Dv, qk_scale, scale,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
                QH=cfg.qh, QW=cfg.qw, KH=cfg.kh, KW=cfg.kw, BLOCK_M=cfg.block_m, **consts,
            )
            if T:  # prefix keys: seen by every query
                _dense_keys(q, k, v, do, lse, delta, dk, dv, T, 0, N, qk_scale, scale, cfg)
            grads[1], grads[2] = dk, dv

        if pk is not None and (needs[3] or needs[4]):  # pooled keys: seen by every image query
            dpk = torch.empty(pk.shape, dtype=pk.dtype, device=dev)
            dpv = torch.empty(pv.shape, dtype=pv.dtype, device=dev)
            _dense_keys(q, pk, pv, do, lse, delta, dpk, dpv, P, T, N, qk_scale, scale, cfg)
            grads[3], grads[4] = dpk, dpv
        return tuple(grads)


def _dense_keys(q, k, v, do, lse, delta, dk, dv, K, q_lo, q_hi, qk_scale, scale, cfg):
    B, N, H, Dk = q.shape
    _wa_dense_keys[(triton.cdiv(K, cfg.block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv,
        K, q_lo, q_hi, N, H, Dk, v.shape[3], qk_scale, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **cfg.consts(),
    )


def window_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hw: Tuple[int, int],
    radius: int,
    num_prefix_tokens: int,
    pooled_k: Optional[Tensor],
    pooled_v: Optional[Tensor],
    scale: float,
    tiles: Optional[Tuple[Tile, Tile]] = None,
) -> Tensor:
    """Triton window attention; arguments already validated by the public function.

    ``tiles``: ``((QH, QW), (KH, KW))`` image query/key patch shapes (products powers of two ≥ 16);
    default :func:`tiles.default_tiles`. Differentiable in q, k, v, pooled_k, pooled_v.
    """
    cfg = Config(q, q.shape[3], v.shape[3], tiles)
    return _WindowAttention.apply(q, k, v, pooled_k, pooled_v, tuple(hw), int(radius), int(num_prefix_tokens),
                                  float(scale), cfg)


def visited_tile_counts(
    q: Tensor, k: Tensor, v: Tensor, hw: Tuple[int, int], radius: int, num_prefix_tokens: int = 0,
    tiles: Optional[Tuple[Tile, Tile]] = None,
) -> Tensor:
    """Image-key patches each query patch of the forward kernel actually visited, ``[B·H, query tiles]``.

    Counted inside the kernel (a test hook); :func:`tiles.visited_key_tiles` is the host-side mirror.
    """
    cfg = Config(q, q.shape[3], v.shape[3], tiles)
    with torch.no_grad():
        _, _, counts = _forward(q, k, v, None, None, tuple(hw), int(radius), int(num_prefix_tokens),
                                1.0 / math.sqrt(q.shape[3]), cfg, count=True)
    return counts


__all__ = ["window_attention_triton", "visited_tile_counts", "Config", "MAX_HEAD_DIM"]
