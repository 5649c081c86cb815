"""Stacking per-chunk results along the token dimension without a list or a ``cat``."""
from __future__ import annotations

from typing import Callable, Iterable, Tuple

from torch import Tensor


def stack_chunks(fn: Callable[[int, int], Tensor], num_tokens: int, step: int) -> Tensor:
    """``out[:, a:b] = fn(a, b)`` over ``[a, b)`` chunks of ``step`` tokens (the last one shorter).

    ``fn`` returns ``[B, b − a, ...]``; one chunk returns ``fn(0, num_tokens)`` itself. The output is
    allocated from the first chunk's shape and dtype.
    """
    if num_tokens <= step:
        return fn(0, num_tokens)
    return stack_ranges(fn, ((a, min(a + step, num_tokens)) for a in range(0, num_tokens, step)), num_tokens)


def stack_ranges(fn: Callable[[int, int], Tensor], ranges: Iterable[Tuple[int, int]], num_tokens: int) -> Tensor:
    """``out[:, a:b] = fn(a, b)`` over the token ranges ``[a, b)`` of ``ranges``, which must tile
    ``[0, num_tokens)`` (any lengths, in any order; every token is written once).

    ``fn`` returns ``[B, b − a, ...]``; a single range covering every token returns ``fn(a, b)`` itself. The output
    ``[B, num_tokens, ...]`` is allocated from the first range's result (shape and dtype).
    """
    out = None
    for a, b in ranges:
        part = fn(a, b)
        if out is None:
            if b - a == num_tokens:
                return part
            out = part.new_empty(part.shape[0], num_tokens, *part.shape[2:])
        out[:, a:b] = part
    return out
