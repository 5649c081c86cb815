"""Stacking per-chunk results along the token dimension into one output."""
from __future__ import annotations

from typing import Callable, Iterable, List, Tuple

import torch
from torch import Tensor


def stack_chunks(fn: Callable[[int, int], Tensor], num_tokens: int, step: int) -> Tensor:
    """``out[:, a:b] = fn(a, b)`` over ``[a, b)`` chunks of ``step`` tokens (the last one shorter).

    ``fn`` returns ``[B, b − a, ...]``; one chunk returns ``fn(0, num_tokens)`` itself (:func:`stack_ranges`).
    """
    if num_tokens <= step:
        return fn(0, num_tokens)
    return stack_ranges(fn, ((a, min(a + step, num_tokens)) for a in range(0, num_tokens, step)), num_tokens)


def stack_ranges(fn: Callable[[int, int], Tensor], ranges: Iterable[Tuple[int, int]], num_tokens: int) -> Tensor:
    """``out[:, a:b] = fn(a, b)`` over the token ranges ``[a, b)`` of ``ranges``, which must tile
    ``[0, num_tokens)`` (any lengths, in any order; every token is written once).

    ``fn`` returns ``[B, b − a, ...]``; a single range covering every token returns ``fn(a, b)`` itself. Without
    autograd recording the output ``[B, num_tokens, ...]`` is allocated from the first range's result and each
    range written into it; with it the results are concatenated once in token order (a slice write per range
    would make the backward copy the whole output's gradient once per range).
    """
    out = None
    kept: List[Tuple[int, Tensor]] = []
    for a, b in ranges:
        part = fn(a, b)
        if out is None and not kept:
            if b - a == num_tokens:
                return part
            if torch.is_grad_enabled() and part.requires_grad:
                kept.append((a, part))
                continue
            out = part.new_empty(part.shape[0], num_tokens, *part.shape[2:])
        if kept:
            kept.append((a, part))
        else:
            out[:, a:b] = part
    if kept:
        return torch.cat([p for _, p in sorted(kept, key=lambda item: item[0])], 1)
    return out
