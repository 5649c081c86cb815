"""Non-overlapping ``bh×bw`` blocks of a 2-D token grid, as batches of short sequences (no N×N mask).

The grid ``h×w`` is cut at multiples of the block from the top-left corner. Where ``bh`` does not divide
``h`` (or ``bw`` does not divide ``w``), the last block row (column) is shorter: the blocks there hold only
real tokens, no padding. The grid therefore falls into at most four regions of equal-shaped blocks
(interior, right strip, bottom strip, corner); each region is reshaped into ``(B·blocks, H, L, D)``
sequences of ``L = block area`` tokens and handed to ``fn``, one rectangle of blocks of about
:data:`CHUNK_ELEMENTS` elements per call (:func:`block_rectangles`), so the block copies stay cache-sized.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

from torch import Tensor

CHUNK_ELEMENTS = 1 << 18  # elements of one band of q, k or v handed to ``fn`` (about; at least one block row)
BlockFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _spans(n: int, b: int) -> List[Tuple[int, int, int]]:
    """``(start, stop, block)`` pieces of ``[0, n)``: whole blocks of ``b``, then the remainder."""
    whole = (n // b) * b
    spans = [(0, whole, b)] if whole else []
    if whole < n:
        spans.append((whole, n, n - whole))
    return spans


def block_rectangles(hw: Tuple[int, int], block: Tuple[int, int], tokens: int) -> List[Tuple[int, int, int, int]]:
    """``(r0, r1, c0, c1)`` rectangles of whole ``bh×bw`` blocks (cut at the grid's edge) that cover the ``h×w`` grid,
    each of about ``tokens`` tokens and at least one block: bands of whole grid rows while one row of blocks holds
    no more than ``tokens`` tokens, else each row of blocks cut into runs of blocks, so that no rectangle grows with
    the grid's width."""
    (h, w), (bh, bw) = hw, block
    rows = tokens // (w * bh)
    if rows >= 1:
        return [(r, min(r + rows * bh, h), 0, w) for r in range(0, h, rows * bh)]
    cols = max(1, tokens // (bh * bw)) * bw
    return [(r, min(r + bh, h), c, min(c + cols, w)) for r in range(0, h, bh) for c in range(0, w, cols)]


def _to_blocks(t: Tensor, bh: int, bw: int) -> Tensor:
    """``(B, R, C, H, D)`` region with ``bh | R``, ``bw | C`` → ``(B·R/bh·C/bw, H, bh·bw, D)``."""
    B, R, C, H, D = t.shape
    t = t.reshape(B, R // bh, bh, C // bw, bw, H, D).permute(0, 1, 3, 5, 2, 4, 6)
    return t.reshape(-1, H, bh * bw, D)


def _from_blocks(o: Tensor, B: int, R: int, C: int, bh: int, bw: int) -> Tensor:
    """Inverse of :func:`_to_blocks`: ``(B·blocks, H, bh·bw, D)`` → ``(B, R, C, H, D)``."""
    H, D = o.shape[1], o.shape[-1]
    o = o.reshape(B, R // bh, C // bw, H, bh, bw, D).permute(0, 1, 4, 2, 5, 3, 6)
    return o.reshape(B, R, C, H, D)


def block_local(q: Tensor, k: Tensor, v: Tensor, hw: Tuple[int, int], block: Tuple[int, int], fn: BlockFn) -> Tensor:
    """Apply ``fn`` to every block of the grid separately.

    ``q, k [B, h·w, H, Dk]``, ``v [B, h·w, H, Dv]`` (image tokens in raster order) → ``[B, h·w, H, Dv]``.
    ``fn(q, k, v)`` takes ``(S, H, L, D)`` batches of ``S`` blocks of ``L`` tokens and returns
    ``(S, H, L, Dv)``; it is called once per rectangle of blocks of each region.
    """
    (h, w), (bh, bw) = hw, block
    B, _, H, _ = q.shape
    grid = [t.reshape(B, h, w, H, t.shape[-1]) for t in (q, k, v)]
    out = v.new_empty(B, h, w, H, v.shape[-1])
    tokens = max(1, CHUNK_ELEMENTS // max(1, B * H * max(t.shape[-1] for t in (q, k, v))))  # per call
    for r0, r1, th in _spans(h, bh):
        for c0, c1, tw in _spans(w, bw):
            for a, b, c, d in block_rectangles((r1 - r0, c1 - c0), (th, tw), tokens):
                rect = (slice(r0 + a, r0 + b), slice(c0 + c, c0 + d))
                parts = [_to_blocks(t[:, rect[0], rect[1]], th, tw) for t in grid]
                out[:, rect[0], rect[1]] = _from_blocks(fn(*parts), B, b - a, d - c, th, tw)
    return out.reshape(B, h * w, H, v.shape[-1])


__all__ = ["block_local", "block_rectangles"]
