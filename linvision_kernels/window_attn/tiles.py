"""Tile geometry of the Triton window-attention kernels, on the host (no triton import).

An *outer* tile (the query patch in the forward and in dq, the key patch in dk/dv) of ``oh×ow`` tokens
at ``(y0, x0)`` meets the discs of radius ``r`` of tokens in rows ``[y0 − (r−1), y0 + oh − 1 + (r−1)]``.
Those rows are cut into *inner* row tiles of height ``ih`` starting at ``y0 − (r−1)`` (not aligned to the
image, so the pattern is the same for every outer tile). For inner row tile ``i`` the smallest row
distance to the outer tile is ``dy_i``; a token of that tile can only be within the disc if
``|dx| ≤ reach_i = isqrt(r² − dy_i² − 1)`` (the largest ``dx`` with ``dx² < r² − dy_i²``). Its columns
``[x0 − reach_i, x0 + ow − 1 + reach_i]`` are cut into inner tiles of width ``iw``. Inner tiles lying
wholly outside the image are skipped (loop bounds clamped), everything else is masked per token.

So the tiles visited by an interior outer tile depend on ``(r, oh, ow, ih, iw)`` only, never on the image.
"""
from __future__ import annotations

import math
from typing import List, Tuple

Tile = Tuple[int, int]

GPU_QUERY_TILE: Tile = (8, 16)  # 128 queries
GPU_KEY_TILE: Tile = (4, 16)  # 64 keys
INTERPRETER_TILE: Tile = (4, 4)  # tl.dot needs 16 rows; tiny tiles keep odd test grids partial


def default_tiles(interpreting: bool) -> Tuple[Tile, Tile]:
    """``(query_tile, key_tile)`` as ``(rows, cols)``; their products must be ≥ 16 and powers of two."""
    if interpreting:
        return INTERPRETER_TILE, INTERPRETER_TILE
    return GPU_QUERY_TILE, GPU_KEY_TILE


def reach_table(outer_h: int, inner_h: int, radius: int) -> List[int]:
    """Column reach of each inner row tile around an outer tile of height ``outer_h``."""
    r = radius
    n = -(-(outer_h + 2 * (r - 1)) // inner_h)
    out = []
    for i in range(n):
        lo = -(r - 1) + i * inner_h
        hi = lo + inner_h - 1
        dy = max(0, lo - (outer_h - 1), -hi)  # ≤ r − 1 by construction
        out.append(math.isqrt(r * r - dy * dy - 1))
    return out


def row_tiles(y0: int, h: int, n_tiles: int, inner_h: int, radius: int) -> range:
    """Inner row tiles ``i`` that overlap image rows ``[0, h)`` (the kernel's clamped loop)."""
    lo = max(radius - 1 - y0, 0) // inner_h
    hi = min(n_tiles, (h - 1 - y0 + radius - 1) // inner_h + 1)
    return range(lo, hi)


def col_tiles(x0: int, w: int, reach: int, outer_w: int, inner_w: int) -> range:
    """Inner column tiles ``j`` of one row tile that overlap image columns ``[0, w)``."""
    n = -(-(outer_w + 2 * reach) // inner_w)
    lo = max(reach - x0, 0) // inner_w
    hi = min(n, (w - 1 - x0 + reach) // inner_w + 1)
    return range(lo, hi)


def visited_key_tiles(hw: Tuple[int, int], radius: int, query_tile: Tile, key_tile: Tile) -> List[int]:
    """Key tiles visited per query tile, query tiles in raster order (mirror of the forward kernel's loops)."""
    h, w = hw
    (qh, qw), (kh, kw) = query_tile, key_tile
    reach = reach_table(qh, kh, radius)
    counts = []
    for ty in range(-(-h // qh)):
        for tx in range(-(-w // qw)):
            y0, x0 = ty * qh, tx * qw
            counts.append(
                sum(len(col_tiles(x0, w, reach[i], qw, kw)) for i in row_tiles(y0, h, len(reach), kh, radius))
            )
    return counts


__all__ = ["default_tiles", "reach_table", "row_tiles", "col_tiles", "visited_key_tiles"]
