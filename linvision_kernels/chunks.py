"""Stacking per-chunk results along the token dimension."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def stack_chunks(fn: Callable[[int, int], Tensor], num_tokens: int, step: int) -> Tensor:
    """``out[:, a:b] = fn(a, b)`` over ``[a, b)`` chunks of ``step`` tokens (the last one shorter).

    ``fn`` returns ``[B, b − a, ...]``; one chunk returns ``fn(0, num_tokens)`` itself. Without autograd
    recording the chunks are written into one output allocated from the first chunk's shape and dtype; with
    it they are concatenated once (a slice write per chunk would make the backward copy the whole output's
    gradient once per chunk).
    """
    if num_tokens <= step:
        return fn(0, num_tokens)
    first = fn(0, step)
    rest = range(step, num_tokens, step)
    if torch.is_grad_enabled() and first.requires_grad:
        return torch.cat([first] + [fn(a, min(a + step, num_tokens)) for a in rest], 1)
    out = first.new_empty(first.shape[0], num_tokens, *first.shape[2:])
    out[:, :step] = first
    for a in rest:
        out[:, a : a + step] = fn(a, min(a + step, num_tokens))
    return out
