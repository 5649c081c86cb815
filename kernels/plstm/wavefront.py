"""The inter-chunk wavefront of the chunked 2-D pLSTM without autograd: one state buffer updated in place,
in cache-sized pieces.

Same recurrence and numbers as the autograd form in :func:`.chunked.chunk_scan` (the official
``pLSTM2D_torch`` inter-chunk loop); only the memory traffic differs. Per anti-diagonal that form builds
every chunk's ``2C`` input border states, the transitions, the source states and their sum as separate
full-diagonal tensors (about ten passes over ``2·side`` states of ``Dk × Dv``, far beyond the cache on a
large grid). Here:

- the border states live in one buffer indexed by the chunk's ``cx``: slot ``cx`` holds chunk ``cx``'s
  input border ``[left; top]`` (``[2C, Dk·Dv]``), i.e. the right border of chunk ``cx − 1`` and the
  bottom border of chunk ``cx`` on the previous anti-diagonal. Slot 0's left half and the top half of a
  slot whose chunk starts its column (``cy = 0``) are never written, so they stay zero: no padding and
  no edge cases;
- a diagonal is swept from high ``cx`` to low in pieces of a few chunks, so a piece's writes (right
  borders into slot ``cx + 1``, bottom borders into slot ``cx``) only touch inputs already consumed;
- the flattened leading dims (batch · heads · orientations) are split into groups, each group scanned
  over the whole grid on its own, so that one piece (input borders plus new borders) stays about
  :data:`PIECE_BYTES`; every state is written once and read once from memory.

Per piece of ``n`` chunks (``g`` = the group's leading entries)::

    X   = buf[c0 : c1 + 1]                                  [n, g, 2C, Dk·Dv] input borders [L; U]
    h   = ([M^l M^u] ⊗ q) X                                 [n, g, C², Dv]    reads
    out = (S ⊗ k) v + [T^rl T^ru; T^dl T^du] X              [n, g, 2C, Dk·Dv] right / bottom borders
    buf[c0 + 1 : c1 + 2, :, :C] = out[:, :, :C];  buf[c0 : c1 + 1, :, C:] = out[:, :, C:]
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

PIECE_BYTES = 1 << 20  # input borders of one piece (its new borders are as large): half the 2 MiB L2 of one core


def piece_shape(L: int, longest: int, unit_bytes: int) -> Tuple[int, int]:
    """``(g, span)``: leading entries per group and chunks per piece so that a piece's input borders
    (``g · span`` chunks of ``unit_bytes``) stay about :data:`PIECE_BYTES`; ``longest``: chunks on the
    longest anti-diagonal."""
    units = max(1, PIECE_BYTES // unit_bytes)
    g = max(1, min(L, units // longest))
    return g, max(1, units // g)


def wavefront_nograd(
    qd: Tensor, kd: Tensor, vd: Tensor, trans: Tensor, src: Tensor, mark: Tensor,
    diags: List[Tuple[int, int, int]], NX: int, span: int,
) -> Tensor:
    """Border reads ``[cells, g, C², Dv]`` (cells in diagonal order) of one group's chunk wavefront.

    Inputs in diagonal-major chunk order (:func:`.chunked._diagonal_order`), contiguous:
    ``qd, kd [cells, g, C², Dk]``, ``vd [cells, g, C², Dv]``, ``trans [cells, g, 2C, 2C]``,
    ``src [cells, g, 2C, C²]``, ``mark [cells, g, C², 2C]``; ``diags``: ``(start, lo, hi)`` per
    anti-diagonal; ``NX``: chunk rows; ``span``: chunks per piece (:func:`piece_shape`).
    """
    cells, g, C2, Dk = qd.shape
    Dv = vd.shape[-1]
    C = trans.shape[-1] // 2
    kt = kd.transpose(-1, -2).contiguous()  # [cells, g, Dk, C²]: (S ⊗ k) comes out contiguous
    buf = qd.new_zeros(NX + 1, g, 2 * C, Dk * Dv)
    new = qd.new_empty(span * g, 2 * C, Dk * Dv)  # a piece's new borders
    reads = qd.new_empty(cells, g, C2, Dv)
    for start, lo, hi in diags:
        c1 = hi
        while c1 >= lo:
            c0 = max(lo, c1 - span + 1)
            a, b = start + c0 - lo, start + c1 - lo + 1
            ng = (b - a) * g
            x = buf[c0 : c1 + 1]  # [n, g, 2C, Dk·Dv], contiguous
            mq = mark[a:b, ..., None] * qd[a:b, :, :, None]  # [n, g, C², 2C, Dk]
            torch.bmm(mq.view(ng, C2, 2 * C * Dk), x.view(ng, 2 * C * Dk, Dv), out=reads[a:b].view(ng, C2, Dv))
            sk = src[a:b, :, :, None] * kt[a:b, :, None]  # [n, g, 2C, Dk, C²]
            out = new[:ng]
            torch.bmm(sk.view(ng, 2 * C * Dk, C2), vd[a:b].view(ng, C2, Dv), out=out.view(ng, 2 * C * Dk, Dv))
            out.baddbmm_(trans[a:b].view(ng, 2 * C, 2 * C), x.view(ng, 2 * C, Dk * Dv))
            out = out.view(b - a, g, 2 * C, Dk * Dv)
            buf[c0 + 1 : c1 + 2, :, :C] = out[:, :, :C]
            buf[c0 : c1 + 1, :, C:] = out[:, :, C:]
            c1 = c0 - 1
    return reads
