"""Stacking per-chunk results along the token dimension without a list or a ``cat``."""
from __future__ import annotations

from typing import Callable

from torch import Tensor


def stack_chunks(fn: Callable[[int, int], Tensor], num_tokens: int, step: int) -> Tensor:
    """``out[:, a:b] = fn(a, b)`` over ``[a, b)`` chunks of ``step`` tokens (the last one shorter).

    ``fn`` returns ``[B, b − a, ...]``; one chunk returns ``fn(0, num_tokens)`` itself. The output is
    allocated from the first chunk's shape and dtype.
    """
    if num_tokens <= step:
        return fn(0, num_tokens)
    first = fn(0, step)
    out = first.new_empty(first.shape[0], num_tokens, *first.shape[2:])
    out[:, :step] = first
    for a in range(step, num_tokens, step):
        out[:, a : a + step] = fn(a, min(a + step, num_tokens))
    return out
