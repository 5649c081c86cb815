"""Triton forward and backward of ``gated_scan`` (fused recurrent, fp32 state; kernels in :mod:`.triton_recurrent`).

Plan, per scan (``direction="forward"``: one scan; ``"backward"``: one scan stepping the token index from
``N − 1`` down, no flipped copies; ``"bidirectional"``: the forward scan, then the reverse scan with the
exclusive read added into the same fp32 output):

- forward, grid ``(B·H, Dv tiles)``: the step of :mod:`.naive` token by token, the ``[Dk, BLOCK_V]`` fp32
  state in registers; every ``CHECKPOINT_TOKENS`` steps the state is stored (``[B·H, ⌈N/C⌉, Dk, Dv]`` fp32 per
  scan, saved for the backward: ``Dk·Dv/C`` floats per token and head);
- backward, same grid, checkpoint intervals last to first: the interval's states are recomputed from its
  checkpoint into a per-program fp32 scratch (``[B·H·tiles, C, BLOCK_K, BLOCK_V]``, reused by every interval),
  then the interval is walked in reverse with the state adjoint ``dS``, giving ``dq, dk, dv, dg`` (per head
  or per key channel) and ``dβ``. The sums over value tiles (``dq, dk, dg, dβ``) go through fp32 per-tile
  partials summed in PyTorch.

This is fla's ``fused_recurrent`` scheme (``fla/ops/{gla,delta_rule,gated_delta_rule}/fused_recurrent.py``)
with two deviations: the backward recomputes the states from checkpoints instead of inverting the step (the
delta-rule step ``I − β k kᵀ`` may be singular), and both directions and the exclusive read are flags of
the one kernel. ``qk_l2norm`` and ``allow_neg_eigval`` stay in the PyTorch wrapper (autograd carries them).

Numerics: every load is upcast to fp32, the state and all gradient buffers are fp32; outputs and gradients
are returned in the inputs' dtypes. No ``tl.dot`` (products are broadcast-multiply-sums of a vector and the
state), so the interpreter's bf16 ``tl.dot`` issue does not arise. Offsets are int64. Inputs are read
through their strides (no copies). Limits: ``Dk, Dv ≤ 256``; block sizes are fixed heuristics (no
autotune). Verified under ``TRITON_INTERPRET=1`` only: no GPU run yet.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
from torch import Tensor

from ..triton_support import check_head_dims, pow2_block, strides, sum_splits
from .triton_recurrent import _scan_bwd, _scan_fwd

CHECKPOINT_TOKENS = 64  # steps between stored states (tests lower it to exercise several intervals)
# One program's fp32 state tile: at most this many elements and this Dv width. Chosen from ptxas -v of the
# sm_90 builds (4 warps): no register spills for Dk ≤ 256 (forward 128×32: 215 registers; backward 128×16: 255).
STATE_TILE_ELEMENTS = {"fwd": 128 * 32, "bwd": 128 * 16}
MAX_BLOCK_V = {"fwd": 32, "bwd": 16}


class Tiles(NamedTuple):
    """Block sizes of one (Dk, Dv)."""

    block_k: int
    block_v: int
    v_tiles: int
    num_warps: int


def tiles(dk: int, dv: int, which: str) -> Tiles:
    """Whole Dk (padded to a power of two); a Dv tile of at most ``MAX_BLOCK_V[which]`` columns holding at most
    ``STATE_TILE_ELEMENTS[which]`` fp32 elements; ``which``: ``"fwd"`` or ``"bwd"``."""
    check_head_dims("Dk and Dv", Dk=dk, Dv=dv)
    block_k = pow2_block(dk, 4)  # no tl.dot: no minimum of 16
    block_v = min(pow2_block(dv, 4), MAX_BLOCK_V[which], max(2, STATE_TILE_ELEMENTS[which] // block_k))
    return Tiles(block_k, block_v, triton.cdiv(dv, block_v), 4)


class Scan(NamedTuple):
    """One pass of a call: its gate (``[B, N, H, 1 or Dk]`` or None), reversed order, exclusive read."""

    gate: Optional[Tensor]
    reverse: bool
    exclusive: bool


def _g_mode(g: Optional[Tensor]) -> int:
    return 0 if g is None else (1 if g.shape[-1] == 1 else 2)


def _common(q, k, v, g, beta):
    """The pointer arguments' dummies and the stride tuples shared by both kernels."""
    return (g if g is not None else q, beta if beta is not None else q,
            (*q.stride(), *k.stride(), *v.stride(), *strides(g, 4), *strides(beta, 3)))


def _forward(q, k, v, beta, scan: Scan, out: Tensor, accumulate: bool, scale: float) -> Tensor:
    """Run one scan into ``out``; returns its ``[B·H, ⌈N/C⌉, Dk, Dv]`` fp32 checkpoints."""
    B, N, H, Dk = q.shape
    Dv = v.shape[-1]
    cfg = tiles(Dk, Dv, "fwd")
    n_ck = triton.cdiv(N, CHECKPOINT_TOKENS)
    ckpt = torch.empty((B * H, n_ck, Dk, Dv), dtype=torch.float32, device=q.device)
    g_arg, b_arg, in_strides = _common(q, k, v, scan.gate, beta)
    _scan_fwd[(B * H, cfg.v_tiles)](
        q, k, v, g_arg, b_arg, out, ckpt,
        N, H, Dk, Dv, n_ck, float(scale),
        *in_strides, *out.stride(),
        G_MODE=_g_mode(scan.gate), HAS_BETA=beta is not None, EXCLUSIVE=scan.exclusive, REVERSE=scan.reverse,
        ACCUMULATE=accumulate, CKPT=CHECKPOINT_TOKENS, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
    )
    return ckpt


class _Grads(NamedTuple):
    """fp32 gradient buffers of one call; ``dg`` holds one buffer per distinct gate."""

    dq: Tensor  # [tiles, B, N, H, Dk]
    dk: Tensor
    dv: Tensor  # [B, N, H, Dv]
    dg: List[Optional[Tensor]]  # [tiles, B, N, H, 1 or Dk]
    db: Optional[Tensor]  # [tiles, B, N, H]


def _backward(q, k, v, beta, do, scan: Scan, ckpt: Tensor, grads: _Grads, dg: Optional[Tensor],
              accumulate: bool, accumulate_dg: bool, scale: float) -> None:
    """Add (or write) one scan's gradients into ``grads`` (``dg``: this scan's gate buffer)."""
    B, N, H, Dk = q.shape
    Dv = v.shape[-1]
    cfg = tiles(Dk, Dv, "bwd")
    if grads.dq.shape[0] != cfg.v_tiles:
        raise AssertionError("gradient partials sized for another tiling")
    n_ck = ckpt.shape[1]
    scratch = torch.empty((B * H * cfg.v_tiles, CHECKPOINT_TOKENS, cfg.block_k, cfg.block_v),
                          dtype=torch.float32, device=q.device)
    g_arg, b_arg, in_strides = _common(q, k, v, scan.gate, beta)
    dg_arg = dg if dg is not None else grads.dq
    db_arg = grads.db if grads.db is not None else grads.dq
    _scan_bwd[(B * H, cfg.v_tiles)](
        q, k, v, g_arg, b_arg, do, ckpt, scratch,
        grads.dq, grads.dk, grads.dv, dg_arg, db_arg,
        N, H, Dk, Dv, n_ck, float(scale), grads.dq[0].numel(), dg_arg[0].numel(), db_arg[0].numel(),
        *in_strides, *do.stride(),
        G_MODE=_g_mode(scan.gate), HAS_BETA=beta is not None, EXCLUSIVE=scan.exclusive, REVERSE=scan.reverse,
        ACCUMULATE=accumulate, ACCUMULATE_DG=accumulate_dg, CKPT=CHECKPOINT_TOKENS,
        BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
    )


def _scans(direction: str, g: Optional[Tensor], g_backward: Optional[Tensor]) -> Tuple[Scan, ...]:
    if direction == "forward":
        return (Scan(g, False, False),)
    if direction == "backward":
        return (Scan(g, True, False),)
    return Scan(g, False, False), Scan(g if g_backward is None else g_backward, True, True)


class _GatedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, g_backward, scale, direction):
        B, N, H, Dk = q.shape
        scans = _scans(direction, g, g_backward)
        out_dtype = q.dtype if len(scans) == 1 else torch.float32  # two scans add in fp32
        out = torch.empty((B, N, H, v.shape[-1]), dtype=out_dtype, device=q.device)
        ckpts = [_forward(q, k, v, beta, s, out, i > 0, scale) for i, s in enumerate(scans)]
        ctx.save_for_backward(q, k, v, g, beta, g_backward, *ckpts)
        ctx.scale, ctx.direction = scale, direction
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, beta, g_backward, *ckpts = ctx.saved_tensors
        scans = _scans(ctx.direction, g, g_backward)
        B, N, H, Dk = q.shape
        Dv = v.shape[-1]
        n_t = tiles(Dk, Dv, "bwd").v_tiles
        f32 = dict(dtype=torch.float32, device=q.device)

        def gate_buffer(t):
            return None if t is None else torch.empty((n_t, B, N, H, t.shape[-1]), **f32)

        grads = _Grads(
            torch.empty((n_t, B, N, H, Dk), **f32), torch.empty((n_t, B, N, H, Dk), **f32),
            torch.empty((B, N, H, Dv), **f32), [gate_buffer(g), gate_buffer(g_backward)],
            None if beta is None else torch.empty((n_t, B, N, H), **f32),
        )
        for i, s in enumerate(scans):
            own = i == 1 and g_backward is not None  # the reverse scan's separate gate
            dg = grads.dg[1] if own else grads.dg[0]
            _backward(q, k, v, beta, do, s, ckpts[i], grads, dg, i > 0, i > 0 and not own, ctx.scale)

        def cast(buf, like, partial=True):
            if buf is None or like is None:
                return None
            return (sum_splits(buf) if partial else buf).to(like.dtype)

        dq, dk, dv = cast(grads.dq, q), cast(grads.dk, k), cast(grads.dv, v, partial=False)
        return dq, dk, dv, cast(grads.dg[0], g), cast(grads.db, beta), cast(grads.dg[1], g_backward), None, None


def gated_scan_triton(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor],
                      g_backward: Optional[Tensor], scale: float, direction: str) -> Tensor:
    """All directions of :func:`linvision.kernels.gated_scan` (validated inputs: ``g``, ``g_backward``
    ``[B, N, H, 1 or Dk]`` or None, ``beta [B, N, H]`` or None, already doubled for negative eigenvalues);
    ``[B, N, H, Dv]`` in ``q``'s dtype, differentiable in every tensor argument."""
    return _GatedScan.apply(q, k, v, g, beta, g_backward, scale, direction)


__all__ = ["CHECKPOINT_TOKENS", "gated_scan_triton", "tiles"]
