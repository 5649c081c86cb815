"""PyTorch forms of the 2-D pLSTM built on the log-doubling cell matrices (:mod:`.doubling`).

- :func:`plstm2d_full_g`: the vision models' form (``plstm_2d_fused.py::pLSTM2D_parallel_fused_torch``):
  one cell covers the whole grid, padded to a square power of two, and the full ``N × N`` gating matrix
  ``G`` (four orientations summed, ``D`` on the diagonal) is applied as ``s·Σ G (q·k′) v′``. Quadratic
  in N; the reference for the official form.
- :func:`plstm2d_chunked`: linear in N. The grid is cut into ``C × C`` chunks (``C = chunk_size``, a power
  of two); inside a chunk the intra-chunk ``G`` is applied quadratically, across chunks the border states
  (``C`` states of ``Dk × Dv`` per border) are passed along a wavefront over the chunk anti-diagonals,
  each anti-diagonal batched (the official ``pLSTM2D_torch`` inter-chunk loop).

Orientations: orientation ``o`` works on the grid flipped by ``ORIENTATION_FLIPS[o]`` (a *frame*,
:mod:`.frames`). Frames are padded at their high-x / high-y end to whole chunks with zero gates and zero q, k,
v; every monotone path between two real nodes stays inside their bounding box, so padding never changes a real
output.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .doubling import CellMatrices, cell_matrices
from .frames import chunk_nodes, from_frames, to_frames, unchunk_nodes
from .naive import ORIENTATION_FLIPS, compute_dtype, direct_term
from .wavefront import piece_shape, strip_order, wavefront_nograd


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _frames(per_orientation, hw: Tuple[int, int], orientations: Sequence[int], padded: Tuple[int, int],
            dtype: torch.dtype) -> Tensor:
    """``per_orientation(i)`` ``[B, N, H, *rest]`` for each ``i < len(orientations)`` → ``[B, H, O, Xp, Yp, *rest]``:
    the ``i``-th tensor flipped by ``ORIENTATION_FLIPS[orientations[i]]``, zero-padded at the high ends."""
    X, Y = hw
    Xp, Yp = padded
    frames = []
    for i, o in enumerate(orientations):
        g = per_orientation(i).to(dtype).unflatten(1, (X, Y)).movedim(3, 1)  # [B, H, X, Y, *rest]
        fx, fy = ORIENTATION_FLIPS[o]
        dims = [d for d, f in ((2, fx), (3, fy)) if f]
        frames.append(g.flip(dims) if dims else g)
    f = torch.stack(frames, dim=2)  # [B, H, O, X, Y, *rest]
    pad = [0, 0] * (f.dim() - 5) + [0, Yp - Y, 0, Xp - X]
    return torch.nn.functional.pad(f, pad) if (Xp > X or Yp > Y) else f


def gate_frames(t: Optional[Tensor], hw, padded, dtype) -> Optional[Tensor]:
    """Gates ``[B, N, H, O]`` → ``[B, H, O, Xp, Yp]``, the ``o``-th flipped as orientation ``o``."""
    if t is None:
        return None
    return _frames(lambda o: t[..., o], hw, range(t.shape[-1]), padded, dtype)


def frame_cell_matrices(s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u, hw, padded, chunk: int, dtype) -> CellMatrices:
    """Cell matrices ``[B, H, O, NX, NY, ·, ·]`` of ``chunk``-sized cells of every orientation's frame (gates
    ``[B, N, H, O]``)."""
    gf = [gate_frames(t, hw, padded, dtype) for t in (s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u)]
    return cell_matrices(*gf, levels=chunk.bit_length() - 1)


def _diagonal_order(NX: int, NY: int):
    """Chunks ordered by anti-diagonal ``cx + cy`` (then ``cx``): the order list, each diagonal's
    ``(start, lo, hi)`` (position of its first chunk in the order, first and last ``cx``), and the
    permutation back to raster order."""
    order, diags = [], []
    for s in range(NX + NY - 1):
        lo, hi = max(0, s - NY + 1), min(NX - 1, s)
        diags.append((len(order), lo, hi))
        order.extend(cx * NY + (s - cx) for cx in range(lo, hi + 1))
    back = [0] * len(order)
    for pos, cell in enumerate(order):
        back[cell] = pos
    return order, diags, back


def _border_inputs(r_prev: Tensor, b_prev: Tensor, s: int, lo: int, hi: int, lo_prev: int) -> Tensor:
    """Input borders of the chunks ``cx = lo..hi`` of anti-diagonal ``s`` from the previous one's outputs.

    ``r_prev``/``b_prev``: right/bottom border states ``[n_prev, L, C, Dk·Dv]`` of diagonal ``s − 1``
    (chunks ``cx = lo_prev..``). Chunk ``(cx, cy)`` takes its left border from ``(cx − 1, cy)`` (zero at
    ``cx = 0``) and its top border from ``(cx, cy − 1)`` (zero at ``cy = 0``); every source is a contiguous
    slice. Returns ``[n, L, 2C, Dk·Dv]``: left border first, then top.
    """
    n, C = hi - lo + 1, r_prev.shape[2]
    x_in = r_prev.new_zeros(n, r_prev.shape[1], 2 * C, r_prev.shape[3])
    first = 1 if lo == 0 else 0
    x_in[first:, :, :C] = r_prev[lo + first - 1 - lo_prev : hi - lo_prev]
    last = n - 1 if hi == s else n
    x_in[:last, :, C:] = b_prev[lo - lo_prev : lo - lo_prev + last]
    return x_in


def chunk_scan(qf: Tensor, kf: Tensor, vf: Tensor, cm: CellMatrices, scale: float) -> Tensor:
    """Chunked scan of frames ``[*lead, Xp, Yp, D]`` with cell matrices ``[*lead, NX, NY, ·, ·]``.

    Returns ``[*lead, Xp, Yp, Dv]`` in the dtype of ``qf``: ``s·q (M^l L + M^u U)`` from the chunk's input
    borders ``L, U`` plus the intra-chunk ``s·Σ G (q·k′) v′``. Border states cross the chunks along a
    wavefront over anti-diagonals; only the latest diagonal's states are alive (memory ``O(√N)`` for them).

    Per anti-diagonal of ``n`` chunks (``L`` = flattened leading dims; the ``2C`` border states of a chunk
    laid out ``[2C·Dk, Dv]``, so transitions, sources and reads are each one batched matmul)::

        X   = [L; U]                                       [n, L, 2C, Dk·Dv] input borders
        out = [T^rl T^ru; T^dl T^du] X + (S ⊗ k) v         [n, L, 2C, Dk·Dv] right / bottom borders
        h   = ([M^l M^u] ⊗ q) X                            [n, L, C², Dv]

    with ``(S ⊗ k)[(a, i), p] = S[a, p] k_p[i]`` and ``(M ⊗ q)[p, (a, i)] = M[p, a] q_p[i]``.
    Under autograd every anti-diagonal is one batched step (:func:`_wavefront_autograd`). Without it
    (inference) the leading entries go in groups and the chunk rows in strips, each group scanned strip by
    strip with its border states in one small buffer updated in place (:mod:`.wavefront`): the same
    numbers, cache-sized memory traffic, so the time grows linearly with the grid.
    """
    C = cm.size
    lead, (Xp, Yp) = qf.shape[:-3], qf.shape[-3:-1]
    L = qf.shape[:-3].numel()
    q, k, v = (t.reshape(L, *t.shape[-3:]) for t in (qf, kf, vf))
    cms = CellMatrices(*(t.reshape(L, *t.shape[-4:]) for t in cm))
    NX, NY = Xp // C, Yp // C
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *cms)):
        order, diags, back = _diagonal_order(NX, NY)

        def wavefront(*args):
            return _wavefront_autograd(*args, diags=diags)

        return scan_frames(q, k, v, cms, scale, order, back, wavefront).reshape(*lead, Xp, Yp, vf.shape[-1])
    g, T = piece_shape(L, NX, NY, 2 * C * k.shape[-1] * v.shape[-1] * q.element_size())
    order, steps, back = strip_order(NX, NY, T)

    def wavefront(*args):
        return wavefront_nograd(*args, steps=steps, NY=NY)

    out = q.new_empty(L, Xp, Yp, v.shape[-1])
    for l0 in range(0, L, g):
        part = CellMatrices(*(t[l0 : l0 + g] for t in cms))
        out[l0 : l0 + g] = scan_frames(q[l0 : l0 + g], k[l0 : l0 + g], v[l0 : l0 + g], part, scale, order, back, wavefront)
    return out.reshape(*lead, Xp, Yp, out.shape[-1])


def scan_frames(q, k, v, cm: CellMatrices, scale: float, order, back, wavefront) -> Tensor:
    """:func:`chunk_scan` on one flat leading axis: frames ``[L, Xp, Yp, D]``, cell matrices
    ``[L, NX, NY, ·, ·]``; ``wavefront(qd, kd, vd, trans, src, mark)`` computes the border reads of the
    chunks listed in ``order`` (``back``: its inverse)."""
    C = cm.size
    q, k, v = (chunk_nodes(t, C) for t in (q, k, v))  # [L, NX, NY, C², D]
    L, NX, NY = q.shape[:3]
    Dv = v.shape[-1]
    intra = (cm.g * (q @ k.transpose(-1, -2))) @ v
    order_t = torch.tensor(order, device=q.device)

    def in_order(t):  # [L, NX, NY, r, c] -> [NX·NY (in ``order``), L, r, c], contiguous
        return t.flatten(1, 2).transpose(0, 1).index_select(0, order_t)

    trans = in_order(torch.cat([torch.cat([cm.trl, cm.tru], -1), torch.cat([cm.tdl, cm.tdu], -1)], -2))
    src = in_order(torch.cat([cm.sr, cm.sd], -2))  # [cells, L, 2C, C²]
    mark = in_order(torch.cat([cm.ml, cm.mu], -1))  # [cells, L, C², 2C]
    reads = wavefront(in_order(q), in_order(k), in_order(v), trans, src, mark)
    inter = reads.index_select(0, torch.tensor(back, device=q.device)).transpose(0, 1)  # [L, NX·NY, C², Dv]
    inter = inter.reshape(L, NX, NY, C * C, Dv)
    return unchunk_nodes((inter + intra) * scale, C)


def _wavefront_autograd(qd, kd, vd, trans, src, mark, diags) -> Tensor:
    """The wavefront of :func:`chunk_scan` as plain differentiable ops, one batched step per anti-diagonal
    of the whole chunk grid (cells in :func:`_diagonal_order`, ``diags`` its ``(start, lo, hi)``; tensors as
    :func:`.wavefront.wavefront_nograd`). Returns the reads ``[cells, L, C², Dv]``."""
    C = trans.shape[-1] // 2
    Dk, Dv = kd.shape[-1], vd.shape[-1]
    reads = []
    r_prev = b_prev = None
    lo_prev = 0
    for s, (start, lo, hi) in enumerate(diags):
        a, b = start, start + hi - lo + 1
        sk = (src[a:b, :, :, None] * kd[a:b, :, None].transpose(-1, -2)).flatten(-3, -2)  # [n, L, 2C·Dk, C²]
        out = (sk @ vd[a:b]).unflatten(-2, (2 * C, Dk)).flatten(-2)  # [n, L, 2C, Dk·Dv]
        if r_prev is not None:
            x_in = _border_inputs(r_prev, b_prev, s, lo, hi, lo_prev)
            out = out + trans[a:b] @ x_in
            mq = (mark[a:b, ..., None] * qd[a:b, :, :, None]).flatten(-2)  # [n, L, C², 2C·Dk]
            reads.append(mq @ x_in.view(*x_in.shape[:2], 2 * C * Dk, Dv))
        else:
            reads.append(qd.new_zeros(b - a, *qd.shape[1:-1], Dv))
        r_prev, b_prev = out[:, :, :C], out[:, :, C:]
        lo_prev = lo
    return torch.cat(reads)


def plstm2d_chunked(q, k, v, s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u, d, hw, scale, chunk_size: int) -> Tensor:
    """Linear-time chunked 2-D pLSTM as whole frames, the form autograd differentiates (without autograd
    :func:`.by_strip.plstm2d_by_strip` gives the same numbers with strip-sized temporaries); arguments validated,
    gates ``[B, N, H, O]``. Returns compute dtype."""
    ct = compute_dtype(q)
    X, Y = hw
    C = chunk_size
    padded = (-(-X // C) * C, -(-Y // C) * C)
    O = s_r.shape[-1]
    gates = (s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u)
    cm = frame_cell_matrices(*gates, hw, padded, C, ct)
    qf, kf, vf = (to_frames(t, hw, O, padded, ct) for t in (q, k, v))
    scanned = from_frames(chunk_scan(qf, kf, vf, cm, scale), hw)
    return scanned if d is None else scanned + direct_term(q, k, v, d, scale)


def frame_index(hw: Tuple[int, int], padded: Tuple[int, int], o: int, device=None) -> Tensor:
    """Index of each real node (raster order) in orientation ``o``'s padded frame (raster order)."""
    X, Y = hw
    fx, fy = ORIENTATION_FLIPS[o]
    xs = torch.arange(X, device=device)
    ys = torch.arange(Y, device=device)
    xs = X - 1 - xs if fx else xs
    ys = Y - 1 - ys if fy else ys
    return (xs[:, None] * padded[1] + ys[None, :]).flatten()


def gating_matrix_2d(s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u, d, hw) -> Tensor:
    """The full gating matrix ``G [B, H, N, N]`` (rows: targets, columns: sources) by log doubling over
    one cell padded to a square power of two; orientations summed, ``d`` on the diagonal. Compute dtype."""
    X, Y = hw
    P = next_pow2(max(X, Y))
    ct = compute_dtype(s_r)
    cm = frame_cell_matrices(s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u, hw, (P, P), P, ct)
    g = cm.g[..., 0, 0, :, :]  # [B, H, O, P², P²]
    G = None
    for o in range(g.shape[2]):
        idx = frame_index(hw, (P, P), o, device=g.device)
        go = g[:, :, o][..., idx, :][..., :, idx]
        G = go if G is None else G + go
    if d is not None:
        G = G + torch.diag_embed(d.to(ct).transpose(1, 2))
    return G


def plstm2d_full_g(q, k, v, s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u, d, hw, scale) -> Tensor:
    """``s·Σ_{n'} G[n, n'] (q_n·k_{n'}) v_{n'}`` with :func:`gating_matrix_2d`. Returns compute dtype."""
    ct = compute_dtype(q)
    G = gating_matrix_2d(s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u, d, hw)
    qh, kh, vh = (t.to(ct).transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
    out = (G * (qh @ kh.transpose(-1, -2))) @ vh * scale
    return out.transpose(1, 2)
