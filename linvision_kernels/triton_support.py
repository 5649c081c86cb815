"""Host-side helpers shared by the ops' Triton modules: interpreter flag, SM count, block sizes, ``tl.dot``
precision, stride tuples, head-dim limits and the split of a sequence over programs.

Imports triton: only the ops' ``triton`` modules import this (the PyTorch path never does). Device-side
helpers (``@triton.jit``) shared by several ops live in :mod:`.triton_device`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
from torch import Tensor

from .backend import triton_interpreting

MAX_HEAD_DIM = 256  # head dims a kernel holds whole in one program
MAX_SPLITS = 64  # cap on the number of sequence splits of a reduction kernel
PROGRAMS_PER_SM = 4  # reduction and chunked kernels aim at this many programs per SM in total
TOKENS_PER_SPLIT_PER_DIM = 8  # a split covers at least 8·max(Dk, Dv) tokens (partials ≲ 25% of its K/V bytes)
INTERPRETER_SM_COUNT = 4  # pretend SM count under TRITON_INTERPRET (CPU tensors)


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton
        return triton_interpreting()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; ``INTERPRETER_SM_COUNT`` for CPU tensors (interpreter)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SM_COUNT


def pow2_block(n: int, minimum: int = 16) -> int:
    """``n`` rounded up to a power of two, at least ``minimum`` (``tl.dot`` needs 16 on every dimension)."""
    return max(minimum, triton.next_power_of_2(n))


def value_tile(block_k: int, dv: int, max_acc: int) -> int:
    """Dv tile of a program that holds a ``[block_k, tile]`` fp32 accumulator of at most ``max_acc`` elements."""
    return min(pow2_block(dv), max(16, max_acc // block_k))


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of a ``tl.dot`` on fp32 (or fp64) operands loaded from inputs of ``dtype``.

    ``"ieee"`` for fp32 and fp64 inputs (exact to their rounding); ``"tf32"`` for fp16/bf16 inputs, whose
    values are exact in tf32 (10-bit mantissa), so only fp32 intermediates are rounded inside the product.
    """
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def fp32_dot_operands(dtype: torch.dtype, interpreted: bool) -> bool:
    """Whether ``tl.dot`` operands must be fp32 rather than the input dtype: fp32 inputs, and bf16 inputs
    under the interpreter (whose bf16 ``tl.dot`` is wrong)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted)


def check_head_dims(what: str, limit: int = MAX_HEAD_DIM, **dims: int) -> None:
    """``ValueError`` naming ``dims`` when one exceeds ``limit`` (``what``: how the message names them)."""
    if any(d > limit for d in dims.values()):
        got = ", ".join(f"{name}={d}" for name, d in dims.items())
        raise ValueError(f"the Triton backend supports {what} up to {limit}, got {got}")


def strides(t: Optional[Tensor], n: int) -> Tuple[int, ...]:
    """``t.stride()``, or ``n`` zeros for an absent optional tensor (the kernel gets a dummy pointer)."""
    return tuple(t.stride()) if t is not None else (0,) * n


def sum_splits(part: Tensor) -> Tensor:
    """Deterministic sum of a ``[splits, ...]`` partial buffer over its split axis (a view for one split)."""
    return part[0] if part.shape[0] == 1 else part.sum(0)


class SplitPlan(NamedTuple):
    """A sequence cut into ``splits`` contiguous ranges of ``blocks_per_split`` token blocks."""

    blocks: int
    splits: int
    blocks_per_split: int


def _balanced(blocks: int, splits: int) -> SplitPlan:
    splits = max(1, min(splits, blocks))
    per = max(1, triton.cdiv(blocks, splits))
    return SplitPlan(blocks, max(1, triton.cdiv(blocks, per)), per)  # re-balanced: no split is empty


def _programs_wanted(sm_count: int, batch_heads: int, v_tiles: int) -> int:
    return triton.cdiv(PROGRAMS_PER_SM * sm_count, max(1, batch_heads * v_tiles))


def plan_splits(
    seq_len: int, block_t: int, batch_heads: int, v_tiles: int, sm_count: int, min_tokens: int,
    max_splits: int = MAX_SPLITS,
) -> SplitPlan:
    """Sequence splits of a reduction kernel (fp32 partials per split), bounded by ``max_splits`` for any N.

    ``min(programs wanted / (B·H·tiles), seq_len / min_tokens, max_splits, token blocks)``, at least one;
    then re-balanced so that no split is empty. Once ``seq_len`` is large enough the result no longer
    depends on it.
    """
    by_tokens = seq_len // max(1, min_tokens)
    wanted = _programs_wanted(sm_count, batch_heads, v_tiles)
    return _balanced(triton.cdiv(seq_len, block_t), min(wanted, by_tokens, max_splits))


def chunk_plan(seq_len: int, block_t: int, batch_heads: int, v_tiles: int, sm_count: int) -> SplitPlan:
    """Chunks of a per-token kernel: each program walks a contiguous chunk of blocks (so it loads a state
    once); ``PROGRAMS_PER_SM`` programs per SM in total, no partials."""
    return _balanced(triton.cdiv(seq_len, block_t), _programs_wanted(sm_count, batch_heads, v_tiles))


__all__ = [
    "INTERPRETER_SM_COUNT",
    "MAX_HEAD_DIM",
    "MAX_SPLITS",
    "PROGRAMS_PER_SM",
    "SplitPlan",
    "TOKENS_PER_SPLIT_PER_DIM",
    "check_head_dims",
    "chunk_plan",
    "dot_precision",
    "fp32_dot_operands",
    "interpreting",
    "plan_splits",
    "pow2_block",
    "sm_count",
    "strides",
    "sum_splits",
    "value_tile",
]
