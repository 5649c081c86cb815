"""The chunked 2-D pLSTM without autograd (inference): a few (head, orientation) entries at a time, strip by strip
of chunk rows.

Same numbers as :func:`.chunked.plstm2d_chunked` (its autograd form), in another order. A group of entries (as many
as keep their frames within :data:`GROUP_FRAME_BYTES`, at least :data:`MIN_GROUP_ENTRIES`) is scanned
strip after strip of its frames' chunk rows, each strip holding about :data:`STRIP_FRAME_BYTES`:

- the strip's q, k, v frame rows are copied from the tokens (flipped per orientation, zero-padded) and its cells'
  transfer matrices built from its gate rows (a cell's matrices depend on its own gates only);
- its intra-chunk term and its part of the chunk wavefront run; the right borders leaving its last chunk row are
  kept (:class:`.wavefront.StripWavefront`) and enter the next strip;
- its outputs are added into the result, flipped back to the grid rows they belong to.

So no temporary grows with the grid: on a large grid each of a whole frame's ten or so temporaries would be a fresh,
page-faulted allocation for every entry, which made the time per token grow with the grid.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..chunks import stack_chunks
from .chunked import scan_frames
from .doubling import cell_matrices
from .frames import STRIP_ELEMENTS, add_frame_rows, frame_copies
from .naive import direct_term
from .wavefront import PIECE_BYTES, StripWavefront, strip_order

GROUP_FRAME_BYTES = 1 << 22  # one frame of the entries scanned together (4 MiB) on a small grid
MIN_GROUP_ENTRIES = 4  # entries scanned together on any grid (one head's four orientations): a strip's work per
# Python-level op is then the same at every grid size, so the interpreter's share of the time stays constant
STRIP_FRAME_BYTES = 1 << 22  # one strip of a group's frame rows (4 MiB): a 128 × 128 frame of 64 fp32 channels


def plstm2d_by_strip(q, k, v, s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u, d, hw, scale, chunk_size: int) -> Tensor:
    """The chunked 2-D pLSTM without autograd, arguments validated (gates ``[B, N, H, O]``): a few (head,
    orientation) entries of one sample at a time, added into one output ``[B, N, H, Dv]`` (compute dtype) that
    starts as the direct term."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = chunk_size
    X, Y = hw
    padded = (-(-X // C) * C, -(-Y // C) * C)
    gates = (s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u)
    B, N, H = q.shape[:3]
    Dv = v.shape[-1]
    O = s_r.shape[-1]
    if d is None:
        out = q.new_zeros(B, N, H, Dv, dtype=ct)
    else:  # the direct term, in chunks of tokens: cache-sized temporaries
        step = max(1, STRIP_ELEMENTS // max(1, B * H * Dv))
        out = stack_chunks(lambda a, b: direct_term(q[:, a:b], k[:, a:b], v[:, a:b], d[:, a:b], scale), N, step)
    entry_bytes = padded[0] * padded[1] * max(q.shape[-1], Dv) * out.element_size()
    per_group = max(MIN_GROUP_ENTRIES, GROUP_FRAME_BYTES // entry_bytes)
    og = min(O, per_group)  # orientations per group, then heads
    hg = max(1, min(H, per_group // og))
    for b in range(B):
        for h0 in range(0, H, hg):
            part = lambda t: t[b : b + 1, :, h0 : h0 + hg]  # noqa: E731  [1, N, hg, ...]
            for o0 in range(0, O, og):
                group_gates = [None if g is None else part(g)[..., o0 : o0 + og] for g in gates]
                scan_group(part(q), part(k), part(v), group_gates, hw, padded, range(o0, min(o0 + og, O)), C, scale,
                           part(out))
    return out


def scan_group(q: Tensor, k: Tensor, v: Tensor, gates: Sequence[Optional[Tensor]], hw: Tuple[int, int],
               padded: Tuple[int, int], orientations: Sequence[int], C: int, scale: float, out: Tensor) -> None:
    """Add the chunked scan of one group's entries into ``out [1, N, h, Dv]``, strip by strip of chunk rows.

    ``q, k [1, N, h, Dk]``, ``v [1, N, h, Dv]``; ``gates`` (8, ``None`` where absent) ``[1, N, h, len(orientations)]``,
    gate ``i`` of orientation ``orientations[i]``; the entries are the ``h · len(orientations)`` (head, orientation)
    pairs."""
    ct = out.dtype
    h, Dk, Dv = q.shape[2], q.shape[-1], v.shape[-1]
    n_o = len(orientations)
    L = h * n_o
    Xp, Yp = padded
    NX, NY = Xp // C, Yp // C
    chunk_row_bytes = L * C * Yp * max(Dk, Dv) * out.element_size()
    S = max(1, min(NX, STRIP_FRAME_BYTES // chunk_row_bytes))  # chunk rows per strip
    T = max(1, min(S, PIECE_BYTES // (2 * C * Dk * Dv * out.element_size() * L)))  # chunk rows per wavefront piece
    wave = StripWavefront(NY, L, C, Dk, Dv, T, out)
    levels = C.bit_length() - 1
    for x0 in range(0, NX, S):
        rows = (x0 * C, min(x0 + S, NX) * C)
        qf, kf, vf = (frame_copies(t, hw, orientations, padded, ct, rows).flatten(0, 2) for t in (q, k, v))
        gf = [None if g is None else gate_rows(g, hw, orientations, padded, rows, ct).flatten(0, 2) for g in gates]
        cm = cell_matrices(*gf, levels=levels)  # [L, strip rows, NY, ·, ·]
        order, steps, back = strip_order(cm.g.shape[1], NY, T)
        scanned = scan_frames(qf, kf, vf, cm, scale, order, back, lambda *args: wave.run(*args, steps=steps))
        add_frame_rows(scanned.view(1, h, n_o, *scanned.shape[1:]), hw, orientations, rows[0], out)


def gate_rows(g: Tensor, hw: Tuple[int, int], orientations: Sequence[int], padded: Tuple[int, int],
              rows: Tuple[int, int], dtype: torch.dtype) -> Tensor:
    """Gates ``[B, N, H, O]`` (gate ``i`` of orientation ``orientations[i]``) → their frame rows ``rows``,
    ``[B, H, O, r1 − r0, Yp]``."""
    return torch.stack([frame_copies(g[..., i], hw, (o,), padded, dtype, rows)[:, :, 0]
                        for i, o in enumerate(orientations)], 2)


__all__ = ["GROUP_FRAME_BYTES", "MIN_GROUP_ENTRIES", "STRIP_FRAME_BYTES", "gate_rows", "plstm2d_by_strip", "scan_group"]
