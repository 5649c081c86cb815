"""Device-side helpers shared by the ops' Triton kernels (``@triton.jit``; Triton inlines them into each kernel).

Host-side helpers (block sizes, split plans, SM count, ...) live in :mod:`.triton_support`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def program_head(AXIS: tl.constexpr, H):
    """This program's (batch·head) index along grid axis ``AXIS`` (int64), and its batch and head."""
    pid_bh = tl.program_id(AXIS).to(tl.int64)
    return pid_bh, pid_bh // H, pid_bh % H


@triton.jit
def flat_head_block(num_blocks, H, n, BLOCK: tl.constexpr):
    """Decode a flat grid over ``B·H × num_blocks`` token blocks: (batch·head), batch, head, block, and the block's
    int64 token offsets and their mask ``< n``."""
    pid = tl.program_id(0).to(tl.int64)
    pid_bh = pid // num_blocks
    blk = pid % num_blocks
    offs, mask = token_block(blk, n, BLOCK)
    return pid_bh, pid_bh // H, pid_bh % H, blk, offs, mask


@triton.jit
def load_tile(base, rows, row_mask, row_stride, cols, col_mask, col_stride, other: tl.constexpr = 0.0):
    """The ``[rows, cols]`` tile at ``base`` read through its strides, ``other`` where masked; stored dtype."""
    return tl.load(
        base + rows[:, None] * row_stride + cols[None, :] * col_stride,
        mask=row_mask[:, None] & col_mask[None, :], other=other,
    )


@triton.jit
def store_tile(base, rows, row_mask, row_stride, cols, col_mask, col_stride, value):
    """Write ``value`` (cast to the pointer's element type) to the ``[rows, cols]`` tile at ``base``."""
    tl.store(
        base + rows[:, None] * row_stride + cols[None, :] * col_stride, value.to(base.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def split_blocks(pid, blocks_per_split, n, BLOCK: tl.constexpr):
    """Token blocks ``[first, last)`` of split ``pid`` when ``n`` tokens in blocks of ``BLOCK`` are cut into
    ranges of ``blocks_per_split`` blocks (the last range may be shorter)."""
    num_blocks = tl.cdiv(n, BLOCK)
    first = pid * blocks_per_split
    last = tl.minimum(first + blocks_per_split, num_blocks)
    return first, last


@triton.jit
def block_range(start, n, BLOCK: tl.constexpr):
    """Offsets ``start + [0, BLOCK)`` (int32, e.g. a channel tile) and their mask ``< n``."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def token_range(start, n, BLOCK: tl.constexpr):
    """int64 token offsets ``start + [0, BLOCK)`` and their mask ``< n``."""
    offs = (start + tl.arange(0, BLOCK)).to(tl.int64)
    return offs, offs < n


@triton.jit
def token_block(blk, n, BLOCK: tl.constexpr):
    """int64 token offsets of block ``blk`` (``BLOCK`` tokens) and their mask ``< n``."""
    return token_range(blk * BLOCK, n, BLOCK)


__all__ = [
    "block_range", "flat_head_block", "load_tile", "program_head", "split_blocks", "store_tile", "token_block",
    "token_range",
]
