"""Chunked form of the gated / delta-rule scan: the PyTorch reference and CPU path of ``gated_scan``.

Tokens are cut into chunks of ``C``; inside a chunk everything is a ``C × C`` product, across chunks an fp32
state ``S [B, H, Dk, Dv]`` is passed (the Lightning-Attention-2 / fla chunk scheme). With ``b_t`` the
cumulative log decay inside the chunk (per key channel) and ``Γ_t = diag(exp b_t)``:

- non-delta: ``u_t = v_t``;
- delta rule, WY / UT representation (as fla's chunk kernels): the new values solve the unit lower-triangular
  system ``(I + A) U = diag(β) V − diag(β) (K ⊙ e^b) S_0`` with ``A_ts = β_t Σ_c k_tc k_sc e^{b_tc − b_sc}``
  (``s < t``), so ``U = U₀ − W S_0`` with ``U₀ = T β V``, ``W = T β (K ⊙ e^b)``, ``T = (I + A)^{-1}``;
- outputs ``o_t = scale·[(q_t ⊙ e^{b_t})ᵀ S_0 + Σ_{s ≤ t} (Σ_c q_tc k_sc e^{b_tc − b_sc}) u_s]`` (``s < t`` when
  exclusive), next state ``S_C = Γ_C S_0 + ΔS − M S_0`` with ``ΔS = Σ_s (k_s ⊙ e^{b_C − b_s}) u₀_sᵀ`` and
  ``M = Σ_s (k_s ⊙ e^{b_C − b_s}) w_sᵀ``.

The scan walks the sequence in groups of whole chunks whose temporaries (the pairwise-decay tensor and the q, k,
v, u tiles) stay under ``GROUP_ELEMENTS`` (about half a core's L2 in fp32, so the cost per token does not grow
with N). Each group is cut from the inputs where they lie (``[B, N, H, D]``, any dtype), cast, reversed for a
backward scan and padded only there, run end to end (intra-chunk products, its part of the state recursion, its
outputs) with the state carried to the next, and its outputs are written to their tokens: no temporary is sized
by the whole sequence, and a backward or bidirectional scan needs no reversed copy of any input. Pairwise decays
are masked before ``exp`` (no overflow for ``g ≤ 0``). Gradients come from autograd through these tensors; with
autograd recording, the group outputs are concatenated once instead of written in place (a slice write per group
would copy the whole output's gradient per group in the backward).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

GROUP_ELEMENTS = 1 << 18  # cap on one group's [B, H, chunks, C, C·(1 or Dk) + 2·Dk + Dv] temporaries (L2-sized)


def _chunks(t: Tensor, C: int) -> Tensor:
    """``[B, L, H, *]`` (L a multiple of C) → ``[B, H, L/C, C, *]``."""
    B, L, H = t.shape[:3]
    return t.reshape(B, L // C, C, H, *t.shape[3:]).permute(0, 3, 1, 2, *range(4, t.dim() + 1))


def _pairwise(x: Tensor, y: Tensor, b: Tensor, lower: Tensor, work: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """``P_ts = Σ_c x_tc y_sc e^{b_tc − b_sc}`` for ``s ≤ t`` (0 above), ``[B, H, n, C, C]``; ``b [.., C, 1 or Dk]``.

    ``work``: two flat buffers (at least ``B·H·n·C·C·Dk`` elements, compute dtype) that hold the per-channel
    ``[B, H, n, C, C, Dk]`` temporaries without autograd, so a scan does not allocate (and page-fault) them anew for
    every group; the same operations in the same order as without them."""
    mask = ~lower[..., None]
    if work is None or b.shape[-1] == 1:
        diff = (b[..., :, None, :] - b[..., None, :, :]).masked_fill(mask, float("-inf"))
        if b.shape[-1] == 1:
            return (x @ y.transpose(-1, -2)) * diff[..., 0].exp()
        return (x[..., :, None, :] * y[..., None, :, :] * diff.exp()).sum(-1)
    shape = (*x.shape[:-1], y.shape[-2], x.shape[-1])
    size = math.prod(shape)
    decay, prod = (w[:size].view(shape) for w in work)
    torch.sub(b[..., :, None, :], b[..., None, :, :], out=decay)
    decay.masked_fill_(mask, float("-inf")).exp_()
    torch.mul(x[..., :, None, :], y[..., None, :, :], out=prod)
    return prod.mul_(decay).sum(-1)


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(Σ x² + eps)`` over the last dim, in fp32 (fp64 for fp64 inputs); fla's ``l2norm``."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dt)
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def _token_writer(add_to: Optional[Tensor], recording: bool, reverse: bool, shape: Tuple[int, ...], like: Tensor):
    """``(write(rows, piece), result())`` for the group outputs ``piece [B, L, H, Dv]`` of the tokens ``rows``.

    Without autograd recording the pieces go straight into one output ``[B, N, H, Dv]`` (``add_to`` itself,
    added to it, when given); with it they are kept and concatenated in token order once (then added)."""
    pieces: List[Tensor] = []
    out = None if recording else (torch.empty(shape, dtype=like.dtype, device=like.device) if add_to is None else add_to)

    def write(rows: slice, piece: Tensor) -> None:
        if recording:
            pieces.append(piece)
        elif add_to is None:
            out[:, rows] = piece
        else:
            out[:, rows] += piece

    def result() -> Tensor:
        if not recording:
            return out
        whole = torch.cat(pieces[::-1] if reverse else pieces, 1)
        return whole if add_to is None else add_to + whole.to(add_to.dtype)

    return write, result


def _group_rows(N: int, span: int, reverse: bool) -> List[slice]:
    """The token rows of each group of ``span`` scan positions, in scan order (from the last token when
    ``reverse``; the last group in scan order is the shorter one)."""
    starts = range(0, N, span)
    return [slice(N - a - min(span, N - a), N - a) if reverse else slice(a, a + min(span, N - a)) for a in starts]


def gated_scan_chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor], scale: float,
    exclusive: bool = False, chunk_size: int = 64, initial_state: Optional[Tensor] = None,
    output_final_state: bool = False, reverse: bool = False, qk_l2norm: bool = False,
    add_to: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Scan over ``N`` tokens, same contract as :func:`.naive.gated_scan_naive` (``initial_state``,
    ``output_final_state`` included); ``g [B, N, H, 1 or Dk]`` or ``None``, ``beta [B, N, H]`` or ``None``.

    ``reverse=True`` scans from token ``N − 1`` down to 0 (the forward scan of the reversed order, outputs in the
    original order); ``qk_l2norm`` L2-normalises q and k (:func:`l2norm`) group by group; ``add_to [B, N, H, Dv]``
    (compute dtype): the outputs are added to it (in place unless autograd is recording) and the sum returned.
    Returns ``[B, N, H, Dv]`` in the compute dtype (fp32, fp64 for fp64 inputs). The padded tail tokens of the
    last group have ``k = 0, g = 0``, so they leave the final state as it is."""
    B, N, H, K = q.shape
    V = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = chunk_size
    width = 1 if g is None else g.shape[-1]
    per_chunk = B * H * C * (C * width + 2 * K + V)
    span = C * max(1, GROUP_ELEMENTS // max(1, per_chunk))  # tokens per group (B = 0: one group)
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = lower.tril(-1)
    eye = torch.eye(C, dtype=dt, device=q.device)
    S = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
    recording = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state, add_to))
    write, result = _token_writer(add_to, recording, reverse, (B, N, H, V), S)
    work = None  # per-channel pairwise-decay buffers for every group, without autograd
    if width > 1 and not recording and N:
        work = tuple(S.new_empty(B * H * (min(span, N + (-N) % C) // C) * C * C * K) for _ in range(2))
    groups = _group_rows(N, span, reverse)
    pieces = {}  # with autograd, each input split once (a slice per group would cost a whole-size gradient each)
    for j, rows in enumerate(groups):  # each group end to end in scan order, the state carried
        L = rows.stop - rows.start
        pad = (-L) % C

        def rows_of(t: Tensor) -> Tensor:
            if not recording:
                return t[:, rows]
            if id(t) not in pieces:
                pieces[id(t)] = t.split([r.stop - r.start for r in sorted(groups, key=lambda r: r.start)], 1)
            return pieces[id(t)][len(groups) - 1 - j if reverse else j]

        def take(t: Tensor, norm: bool = False) -> Tensor:
            """The group's rows in scan order, compute dtype, padded to whole chunks."""
            part = l2norm(rows_of(t)) if norm else rows_of(t).to(dt)
            part = part.flip(1) if reverse else part
            return F.pad(part, (0, 0) * (part.dim() - 2) + (0, pad)) if pad else part

        qg, kg, vg = _chunks(take(q, qk_l2norm), C), _chunks(take(k, qk_l2norm), C), _chunks(take(v), C)
        bg = (qg.new_zeros(B, H, qg.shape[2], C, 1) if g is None else _chunks(take(g), C)).cumsum(3)
        qk = _pairwise(qg, kg, bg, lower, work)
        if exclusive:
            qk = qk.masked_fill(~strict, 0.0)
        u0, w = vg, None
        if beta is not None:
            betag = _chunks(take(beta)[..., None], C)  # [B, H, g, C, 1]
            A = (betag * _pairwise(kg, kg, bg, lower, work)).masked_fill(~strict, 0.0) + eye
            rhs = torch.cat([betag * vg, betag * kg * bg.exp()], -1)
            sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
            u0, w = sol[..., :V], sol[..., V:]
        eb = bg.exp()
        k_tail = (kg * (bg[..., -1:, :] - bg).exp()).transpose(-1, -2)  # [B, H, g, K, C]: (k_s ⊙ e^{b_C − b_s})ᵀ
        dS = k_tail @ u0  # [B, H, g, K, V]
        M = None if w is None else k_tail @ w  # [B, H, g, K, K]
        last = eb[:, :, :, -1][..., None]  # [B, H, g, 1 or K, 1]
        starts = []
        for i in range(qg.shape[2]):
            starts.append(S)
            S = last[:, :, i] * S + dS[:, :, i] if M is None else last[:, :, i] * S + dS[:, :, i] - M[:, :, i] @ S
        S0 = torch.stack(starts, 2)  # [B, H, g, K, V]
        u = u0 if w is None else u0 - w @ S0
        o = scale * ((qg * eb) @ S0 + qk @ u)  # [B, H, g, C, V]
        o = o.permute(0, 2, 3, 1, 4).reshape(B, L + pad, H, V)[:, :L]
        write(rows, o.flip(1) if reverse else o)
    o = result() if N else q.new_zeros(B, 0, H, V, dtype=dt)
    return (o, S) if output_final_state else o


__all__ = ["GROUP_ELEMENTS", "gated_scan_chunked", "l2norm"]
