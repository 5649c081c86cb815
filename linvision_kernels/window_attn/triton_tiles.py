"""Device side of the window-attention tile geometry (:mod:`.tiles` is the host mirror): image patches, the
inner row/column tiles around an outer patch that meet the disc, and reading token rows.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_device import load_tile


@triton.jit
def _load_rows(base, tok, ok, s_n, offs_d, d_ok, s_d, DOT_F32: tl.constexpr):
    """Rows ``tok`` (int64, masked by ``ok``) of one (batch, head) slice; fp32 when ``DOT_F32``."""
    t = load_tile(base, tok, ok, s_n, offs_d, d_ok, s_d)
    if DOT_F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _patch(pid_t, T, h, w, PH: tl.constexpr, PW: tl.constexpr):
    """The ``PH×PW`` image patch ``pid_t`` (raster order of patches): its corner, rows, columns, mask, tokens."""
    n_tx = tl.cdiv(w, PW)
    y0 = (pid_t // n_tx) * PH
    x0 = (pid_t % n_tx) * PW
    offs = tl.arange(0, PH * PW)
    py = y0 + offs // PW
    px = x0 + offs % PW
    ok = (py < h) & (px < w)
    return y0, x0, py, px, ok, (T + py * w + px).to(tl.int64)


@triton.jit
def _row_tiles(y0, r, h, n_row_tiles, IH: tl.constexpr):
    """Inner row tiles ``[i_lo, i_hi)`` around an outer patch at row ``y0`` that overlap the image, and the
    first row of tile 0 (``tiles.row_tiles`` on the host)."""
    base_y = y0 - (r - 1)
    i_lo = tl.maximum(r - 1 - y0, 0) // IH
    i_hi = tl.minimum(n_row_tiles, (h - 1 - base_y) // IH + 1)
    return base_y, i_lo, i_hi


@triton.jit
def _col_tiles(reach_ptr, i, x0, w, OW: tl.constexpr, IW: tl.constexpr):
    """Inner column tiles ``[j_lo, j_hi)`` of row tile ``i`` that overlap the image, and the first column of
    tile 0 (``tiles.col_tiles`` on the host)."""
    reach = tl.load(reach_ptr + i)
    base_x = x0 - reach
    j_lo = tl.maximum(reach - x0, 0) // IW
    j_hi = tl.minimum((OW + 2 * reach + IW - 1) // IW, (w - 1 - base_x) // IW + 1)
    return base_x, j_lo, j_hi
