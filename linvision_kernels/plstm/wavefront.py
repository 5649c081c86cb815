"""The inter-chunk wavefront of the chunked 2-D pLSTM without autograd: strips of chunk rows, one small
state buffer updated in place.

Same recurrence and numbers as the autograd form in :func:`.chunked.chunk_scan` (the official
``pLSTM2D_torch`` inter-chunk loop); only the order and the memory traffic differ. Per anti-diagonal that
form builds every chunk's ``2C`` input border states, the transitions, the source states and their sum as
separate full-diagonal tensors (about ten passes over ``2·side`` states of ``Dk × Dv``, far beyond the
cache on a large grid). Here:

- the flattened leading dims (batch · heads · orientations) are split into groups of ``g`` entries and the
  chunk grid into strips of ``T`` chunk rows (:func:`piece_shape`), so that one step's border states
  (``g · T`` chunks) stay about :data:`PIECE_BYTES` whatever the grid size;
- each group runs strip after strip, each strip as a wavefront over its own anti-diagonals (at most ``T``
  chunks each: one step). The right borders leaving a strip's last chunk row are kept per ``cy`` in
  ``border [NY, g, C, Dk·Dv]`` and enter the next strip's first row;
- inside a strip the border states live in one buffer indexed by the local ``cx``: slot ``cx`` holds chunk
  ``cx``'s input border ``[left; top]`` (``[2C, Dk·Dv]``), i.e. the right border of chunk ``cx − 1`` and
  the bottom border of chunk ``cx`` on the previous anti-diagonal. Slot 0's left half is loaded from
  ``border``; the top half of a slot whose chunk starts its column (``cy = 0``) was zeroed when the strip
  began. A step computes its new borders from the inputs first, then writes them (right borders into slot
  ``cx + 1``, bottom borders into slot ``cx``). Every state is written once and read once.

One step, chunks ``lo..hi`` of a strip's anti-diagonal (``n`` chunks, ``g`` leading entries)::

    X   = buf[lo : hi + 1]                                  [n, g, 2C, Dk·Dv] input borders [L; U]
    h   = ([M^l M^u] ⊗ q) X                                 [n, g, C², Dv]    reads
    out = (S ⊗ k) v + [T^rl T^ru; T^dl T^du] X              [n, g, 2C, Dk·Dv] right / bottom borders
    buf[lo + 1 : hi + 2, :, :C] = out[:, :, :C];  buf[lo : hi + 1, :, C:] = out[:, :, C:]
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

PIECE_BYTES = 1 << 20  # input borders of one step (its new borders are as large): half the 2 MiB L2 of one core

Step = Tuple[int, int, int, int, int]  # (start, rows, s, lo, hi)


def piece_shape(L: int, NX: int, NY: int, unit_bytes: int) -> Tuple[int, int]:
    """``(g, T)``: leading entries per group and chunk rows per strip, so that a step's input borders
    (``g`` entries × at most ``min(T, NX, NY)`` chunks of ``unit_bytes``) stay about :data:`PIECE_BYTES`."""
    units = max(1, PIECE_BYTES // unit_bytes)
    g = max(1, min(L, units // min(NX, NY)))
    return g, max(1, units // g)


def strip_order(NX: int, NY: int, T: int) -> Tuple[List[int], List[Step], List[int]]:
    """Chunks (raster index ``cx·NY + cy``) in the order :func:`wavefront_nograd` visits them: strip by
    strip of ``T`` chunk rows, inside a strip by anti-diagonal, then ``cx``. Returns the order, the steps
    ``(start, rows, s, lo, hi)`` (position of the step's first chunk in the order, the strip's row count,
    the anti-diagonal ``s`` and the local ``cx`` range inside the strip) and the permutation back."""
    order: List[int] = []
    steps: List[Step] = []
    for x0 in range(0, NX, T):
        rows = min(T, NX - x0)
        for s in range(rows + NY - 1):
            lo, hi = max(0, s - NY + 1), min(rows - 1, s)
            steps.append((len(order), rows, s, lo, hi))
            order.extend((x0 + cx) * NY + (s - cx) for cx in range(lo, hi + 1))
    back = [0] * len(order)
    for pos, cell in enumerate(order):
        back[cell] = pos
    return order, steps, back


class StripWavefront:
    """The border states of one group's chunk wavefront without autograd, kept between calls of :meth:`run`: the
    right borders leaving a strip's last chunk row enter the next strip's first, whether that strip is in the
    same call or the next one (a caller may hand the chunk grid over strip by strip).

    ``NY``: chunk columns; ``g``: leading entries; ``C``: chunk size; ``T``: the most chunk rows of a strip;
    ``like``: a tensor of the compute dtype and device.
    """

    def __init__(self, NY: int, g: int, C: int, Dk: int, Dv: int, T: int, like: Tensor):
        self.buf = like.new_empty(T + 1, g, 2 * C, Dk * Dv)  # slot cx: chunk cx's input border [left; top]
        self.border = like.new_zeros(NY, g, C, Dk * Dv)  # right borders leaving the previous strip, by cy
        self.new = like.new_empty(T * g, 2 * C, Dk * Dv)  # a step's new borders

    def run(self, qd: Tensor, kd: Tensor, vd: Tensor, trans: Tensor, src: Tensor, mark: Tensor,
            steps: List[Step]) -> Tensor:
        """Border reads ``[cells, g, C², Dv]`` of the chunks of ``steps`` (whole strips, from
        :func:`strip_order`), inputs in that order as in :func:`wavefront_nograd`."""
        buf, border = self.buf, self.border
        cells, g, C2, Dk = qd.shape
        Dv = vd.shape[-1]
        C = trans.shape[-1] // 2
        kt = kd.transpose(-1, -2).contiguous()  # [cells, g, Dk, C²]: (S ⊗ k) comes out contiguous
        reads = qd.new_empty(cells, g, C2, Dv)
        for start, rows, s, lo, hi in steps:
            if s == 0:
                buf.zero_()
            if lo == 0:
                buf[0, :, :C] = border[s]
            a, b = start, start + hi - lo + 1
            ng = (b - a) * g
            x = buf[lo : hi + 1]  # [n, g, 2C, Dk·Dv], contiguous
            mq = mark[a:b, ..., None] * qd[a:b, :, :, None]  # [n, g, C², 2C, Dk]
            torch.bmm(mq.view(ng, C2, 2 * C * Dk), x.view(ng, 2 * C * Dk, Dv), out=reads[a:b].view(ng, C2, Dv))
            sk = src[a:b, :, :, None] * kt[a:b, :, None]  # [n, g, 2C, Dk, C²]
            out = self.new[:ng]
            torch.bmm(sk.view(ng, 2 * C * Dk, C2), vd[a:b].view(ng, C2, Dv), out=out.view(ng, 2 * C * Dk, Dv))
            out.baddbmm_(trans[a:b].view(ng, 2 * C, 2 * C), x.view(ng, 2 * C, Dk * Dv))
            out = out.view(b - a, g, 2 * C, Dk * Dv)
            buf[lo + 1 : hi + 2, :, :C] = out[:, :, :C]
            buf[lo : hi + 1, :, C:] = out[:, :, C:]
            if hi == rows - 1:  # the strip's last row: its right border enters the next strip
                border[s - hi] = buf[rows, :, :C]
        return reads


def wavefront_nograd(
    qd: Tensor, kd: Tensor, vd: Tensor, trans: Tensor, src: Tensor, mark: Tensor, steps: List[Step], NY: int,
) -> Tensor:
    """Border reads ``[cells, g, C², Dv]`` (cells in :func:`strip_order`) of one group's chunk wavefront.

    Inputs in that order, contiguous: ``qd, kd [cells, g, C², Dk]``, ``vd [cells, g, C², Dv]``,
    ``trans [cells, g, 2C, 2C]``, ``src [cells, g, 2C, C²]``, ``mark [cells, g, C², 2C]``; ``steps`` from
    :func:`strip_order`; ``NY``: chunk columns.
    """
    g, Dk = qd.shape[1], qd.shape[-1]
    T = max(rows for _, rows, _, _, _ in steps)
    wave = StripWavefront(NY, g, trans.shape[-1] // 2, Dk, vd.shape[-1], T, qd)
    return wave.run(qd, kd, vd, trans, src, mark, steps)
