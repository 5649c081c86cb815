"""PyTorch references of circular-window attention (CLEAR): the dense oracle and the lean CPU path.

Token layout (as everywhere in ``kernels``): ``[B, N, H, D]`` with ``N = T + h·w``, the ``T`` prefix
(text) tokens first, then the ``h×w`` image tokens in raster order; optional pooled keys/values
``[B, P, H, D]`` are appended after all ``N`` keys. The support (CLEAR's ``init_local_downsample_mask_flex``)::

    prefix query  → every prefix and image key, no pooled key
    image query   → every prefix key, image keys with dy² + dx² < r² (strict), every pooled key

- :func:`window_mask` builds that predicate as an explicit boolean matrix ``[N, N + P]``.
- :func:`window_attention_dense` is the oracle: dense scores, ``masked_fill(-inf)``, softmax. O(N²) memory.
- :func:`window_attention_blocked` is the PyTorch backend: image queries in 2-D blocks of ``b×b`` tokens,
  each against the ``(b + 2(r−1))²`` window of keys around it plus the prefix and pooled keys; prefix
  queries dense in chunks. Memory and compute O(N·(b + 2r)²), never an N×N matrix.

Both accumulate in fp32 (fp64 for fp64 inputs) and return the input dtype. Arguments are validated by
the public :func:`linvision.kernels.window_attn.window_attention`.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..chunks import stack_ranges

# (a, b, o [B, b − a, H, Dv]) → the caller's token-wise epilogue of the output rows a:b
Epilogue = Callable[[int, int, Tensor], Tensor]

SCORE_ELEMENTS = 1 << 24  # score elements of one chunk of prefix queries (64 MB in fp32)
BLOCK_SCORE_ELEMENTS = 1 << 20  # score elements of one chunk of image-query blocks (4 MB in fp32: stays in cache)
MAX_BLOCK = 32


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def window_mask(
    hw: Tuple[int, int], radius: int, num_prefix_tokens: int = 0, num_pooled: int = 0, device=None
) -> Tensor:
    """CLEAR's attention support as a boolean ``[N, N + P]`` matrix (True = attend), ``N = T + h·w``."""
    h, w = hw
    T, P = num_prefix_tokens, num_pooled
    n = T + h * w
    idx = torch.arange(h * w, device=device)
    y, x = idx // w, idx % w
    disc = (y[:, None] - y[None, :]).square() + (x[:, None] - x[None, :]).square() < radius * radius
    mask = torch.zeros(n, n + P, dtype=torch.bool, device=device)
    mask[:T, :n] = True  # prefix rows: prefix + image keys, not the pooled ones
    mask[T:, :T] = True  # image rows: every prefix key
    mask[T:, T:n] = disc  # ... the disc of image keys
    mask[T:, n:] = True  # ... every pooled key
    return mask


def window_attention_dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hw: Tuple[int, int],
    radius: int,
    num_prefix_tokens: int,
    pooled_k: Optional[Tensor],
    pooled_v: Optional[Tensor],
    scale: float,
) -> Tensor:
    """The oracle: explicit boolean mask and dense masked softmax over ``[N, N + P]`` scores."""
    acc = accumulation_dtype(q.dtype)
    if pooled_k is not None:
        k, v = torch.cat((k, pooled_k), 1), torch.cat((v, pooled_v), 1)
    mask = window_mask(hw, radius, num_prefix_tokens, k.shape[1] - q.shape[1], q.device)
    scores = torch.einsum("bnhd,bmhd->bhnm", q.to(acc), k.to(acc)) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhnm,bmhd->bnhd", probs, v.to(acc)).to(q.dtype)


def default_block(radius: int) -> int:
    """Query block side of the blocked reference: ``clamp(r, 8, 32)`` (window side ``b + 2(r−1)``)."""
    return max(8, min(MAX_BLOCK, radius))


def _image_blocks(t: Tensor, hw: Tuple[int, int], block: Tuple[int, int], rows: slice) -> Tensor:
    """Block rows ``rows`` of ``[B, h·w, H, D]`` image tokens as zero-padded blocks ``[B, H, n, nbx, by·bx, D]``."""
    B, _, H, D = t.shape
    (h, w), (by, bx) = hw, block
    nbx = -(-w // bx)
    r0, r1 = rows.start * by, min(rows.stop * by, h)
    n = -(-(r1 - r0) // by)
    t = t.reshape(B, h, w, H, D)[:, r0:r1]
    t = F.pad(t, (0, 0, 0, 0, 0, nbx * bx - w, 0, n * by - (r1 - r0)))
    return t.reshape(B, n, by, nbx, bx, H, D).permute(0, 5, 1, 3, 2, 4, 6).reshape(B, H, n, nbx, by * bx, D)


def _padded_rows(t: Tensor, hw: Tuple[int, int], width: int, pad: Tuple[int, int], rows: Tuple[int, int]) -> Tensor:
    """Rows ``r0:r1`` of the zero-padded image of tokens ``t [B, h·w, H, D]``: ``[B, H, (r1 − r0)·Wp, D]``, raster
    order (so a key row gather is one contiguous ``D`` vector). The padded image has ``pad = (py, px)`` zero
    rows/columns before the image and reaches ``width = Wp`` columns; its row ``r`` is image row ``r − py``
    (zeros outside ``[0, h)``). Only the band is built, never the whole padded image."""
    B, _, H, D = t.shape
    (h, w), (py, px), (r0, r1) = hw, pad, rows
    lo, hi = max(r0 - py, 0), min(r1 - py, h)  # the image rows inside the band
    t = t.reshape(B, h, w, H, D)[:, lo:hi].permute(0, 3, 1, 2, 4)
    return F.pad(t, (0, 0, px, width - w - px, lo - (r0 - py), r1 - py - hi)).reshape(B, H, (r1 - r0) * width, D)


def _block_disc(block: Tuple[int, int], pad: Tuple[int, int], radius: int, device) -> Tensor:
    """``[by·bx, wy·wx]``: query ``(qy, qx)`` of a block meets window position ``(ky, kx)`` (``dy² + dx² < r²``)."""
    (by, bx), (py, px) = block, pad
    qy, qx = torch.arange(by, device=device), torch.arange(bx, device=device)
    ky, kx = torch.arange(by + 2 * py, device=device) - py, torch.arange(bx + 2 * px, device=device) - px
    dy2 = (ky[None, :] - qy[:, None]).square()  # [by, wy]
    dx2 = (kx[None, :] - qx[:, None]).square()  # [bx, wx]
    return (dy2[:, None, :, None] + dx2[None, :, None, :] < radius * radius).reshape(by * bx, -1)


def _window_keys(block: Tuple[int, int], pad: Tuple[int, int], radius: int, device) -> Tensor:
    """Positions (raster, in the ``wy × wx`` window) of the keys some query of the block can attend:
    the window with its corners cut, the key tiles the Triton kernel visits at one-token granularity."""
    return _block_disc(block, pad, radius, device).any(0).nonzero().flatten()


def window_attention_blocked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hw: Tuple[int, int],
    radius: int,
    num_prefix_tokens: int,
    pooled_k: Optional[Tensor],
    pooled_v: Optional[Tensor],
    scale: float,
    block: Optional[int] = None,
    output: Optional[Epilogue] = None,
) -> Tensor:
    """Lean reference: the same operator without an N×N matrix (see the module docstring).

    ``block``: query block side (default :func:`default_block`). ``output(a, b, o)``: a token-wise epilogue
    applied to each range of output rows ``o [B, b − a, H, Dv]`` (input dtype) as it is computed; the result is
    then the stacked epilogue results, and the attention output is never held whole. Work goes by bands of
    block rows, each against only the rows of padded keys it reaches: no temporary grows past a band.
    Differentiable through autograd.
    """
    acc = accumulation_dtype(q.dtype)
    B, N, H, Dk = q.shape
    Dv = v.shape[3]
    T = num_prefix_tokens
    h, w = hw
    r = radius
    side = default_block(r) if block is None else int(block)
    by, bx = min(side, h), min(side, w)
    py, px = min(r - 1, h - 1), min(r - 1, w - 1)  # no key lies further away than the image itself
    wy, wx = by + 2 * py, bx + 2 * px
    nby, nbx = -(-h // by), -(-w // bx)
    device = q.device
    epilogue = (lambda a, b, o: o) if output is None else output  # noqa: E731

    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    k_pre, v_pre = kf[:, :T], vf[:, :T]
    pk = pooled_k.to(acc) if pooled_k is not None else kf.new_zeros(B, 0, H, Dk)
    pv = pooled_v.to(acc) if pooled_v is not None else vf.new_zeros(B, 0, H, Dv)
    P = pk.shape[1]

    def prefix_rows(a: int, b: int) -> Tensor:
        """Prefix queries ``a:b``: dense over the T + h·w prefix and image keys (never the pooled ones)."""
        s = torch.einsum("bqhd,bmhd->bhqm", qf[:, a:b], kf) * scale
        return epilogue(a, b, torch.einsum("bhqm,bmhd->bqhd", s.softmax(-1), vf).to(q.dtype))

    # Image queries: 2-D blocks against the keys of their window that meet some query's disc, gathered
    # from the padded image by a fixed offset pattern (the same for every block).
    Wp = nbx * bx + 2 * px
    keep = _window_keys((by, bx), (py, px), r, device)  # [W] window positions that meet the block's discs
    W = keep.numel()
    offsets = (keep // wx) * Wp + keep % wx  # [W] in the padded image, from a block's window origin
    origin = (torch.arange(nby, device=device) * by * Wp)[:, None] + torch.arange(nbx, device=device) * bx
    key_idx = origin[:, :, None] + offsets  # [nby, nbx, W]
    inside = F.pad(torch.ones(h, w, dtype=torch.bool, device=device), (px, Wp - w - px, py, nby * by + py - h))
    k_ok = inside.flatten()[key_idx].unsqueeze(2)  # [nby, nbx, 1, W] kept keys inside the image
    q_ok = F.pad(torch.ones(h, w, dtype=torch.bool, device=device), (0, nbx * bx - w, 0, nby * by - h))
    q_ok = q_ok.reshape(nby, by, nbx, bx).permute(0, 2, 1, 3).reshape(nby, nbx, by * bx, 1)
    disc = _block_disc((by, bx), (py, px), r, device).index_select(-1, keep)  # [by·bx, W]
    # Padded query rows get an all-True row: finite (and then discarded) instead of NaN.
    allowed = (disc & k_ok) | ~q_ok  # [nby, nbx, by·bx, W]
    # Score elements of one block: a chunk holds about BLOCK_SCORE_ELEMENTS of them, whole block rows when a
    # block row fits, else a few blocks of one row, so no temporary grows with the image width.
    per_block = B * H * by * bx * (W + T + P)
    cols_per_chunk = min(nbx, max(1, BLOCK_SCORE_ELEMENTS // max(1, per_block)))
    rows_per_chunk = max(1, BLOCK_SCORE_ELEMENTS // max(1, per_block * nbx))

    def attend(qc: Tensor, kc: Tensor, vc: Tensor, allowed_c: Tensor) -> Tensor:
        """Blocks ``qc [B, H, n, m, Q, Dk]`` against their kept window keys ``kc``/``vc [B, H, n, m, W, D]``
        (and the prefix and pooled keys): ``[B, H, n, m, Q, Dv]`` in ``acc``."""
        s_loc = (qc @ kc.transpose(-1, -2)) * scale  # [B, H, n, m, Q, W]
        s_loc = s_loc.masked_fill_(~allowed_c, float("-inf"))
        if not (T or P):
            return s_loc.softmax(-1) @ vc
        s_pre = torch.einsum("bhyxqd,bthd->bhyxqt", qc, k_pre) * scale
        s_pool = torch.einsum("bhyxqd,bthd->bhyxqt", qc, pk) * scale
        p = torch.cat((s_pre, s_loc, s_pool), -1).softmax(-1)
        p_pre, p_loc, p_pool = p.split((T, W, P), -1)
        o = p_loc @ vc + torch.einsum("bhyxqt,bthd->bhyxqd", p_pre, v_pre)
        return o + torch.einsum("bhyxqt,bthd->bhyxqd", p_pool, pv)

    def image_rows(c: slice) -> Tensor:
        """The outputs of the image rows of block rows ``c``, ``[B, rows·w, H, Dv]`` (input dtype)."""
        qc = _image_blocks(qf[:, T:], hw, (by, bx), c)  # [B, H, n, nbx, Q, Dk]
        n = qc.shape[2]
        band = (c.start * by, (c.start + n) * by + 2 * py)  # the padded rows these blocks' windows reach
        k_band = _padded_rows(kf[:, T:], hw, Wp, (py, px), band)
        v_band = _padded_rows(vf[:, T:], hw, Wp, (py, px), band)
        idx, allowed_c = key_idx[c] - band[0] * Wp, allowed[c]  # [n, nbx, W], [n, nbx, Q, W]
        parts = []
        for x0 in range(0, nbx, cols_per_chunk):
            x1 = min(x0 + cols_per_chunk, nbx)
            cols = idx[:, x0:x1].flatten()
            kc = k_band.index_select(2, cols).view(B, H, n, x1 - x0, W, Dk)
            vc = v_band.index_select(2, cols).view(B, H, n, x1 - x0, W, Dv)
            parts.append(attend(qc[:, :, :, x0:x1], kc, vc, allowed_c[:, x0:x1]))
        o = parts[0] if len(parts) == 1 else torch.cat(parts, 3)
        o = o.reshape(B, H, n, nbx, by, bx, Dv).permute(0, 2, 4, 3, 5, 1, 6).reshape(B, n * by, nbx * bx, H, Dv)
        rows = min(n * by, h - c.start * by)
        return o[:, :rows, :w].to(q.dtype).reshape(B, rows * w, H, Dv)

    def rows_of(a: int, b: int) -> Tensor:
        if a < T:
            return prefix_rows(a, b)
        c = slice((a - T) // w // by, -(-((b - T) // w) // by))
        return epilogue(a, b, image_rows(c))

    prefix_step = max(1, SCORE_ELEMENTS // max(1, B * H * N))
    ranges = [(a, min(a + prefix_step, T)) for a in range(0, T, prefix_step)]
    ranges += [(T + a * by * w, T + min((a + rows_per_chunk) * by, h) * w) for a in range(0, nby, rows_per_chunk)]
    return stack_ranges(rows_of, ranges, N)


__all__ = ["window_mask", "window_attention_dense", "window_attention_blocked", "default_block"]
