"""Stacking per-chunk results along the token dimension into one output."""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

# (a, b) → rows a:b of a per-token tensor, [B, b − a, ...]
Rows = Callable[[int, int], Tensor]


def token_source(t: Union[Tensor, Rows], num_tokens: Optional[int], name: str = "v") -> Tuple[Rows, int, Tensor]:
    """``(rows, N, sample)`` of a per-token input given as a tensor ``[B, N, ...]`` or as a function of a token
    range ``t(a, b) = t[:, a:b]`` with ``num_tokens = N`` (then it is never held whole): ``rows(a, b)``, the token
    count and ``rows(0, 1)`` (batch, device, dtype and widths). ``ValueError`` for a missing or mismatched
    ``num_tokens`` or no tokens."""
    if callable(t):
        if num_tokens is None:
            raise ValueError(f"num_keys is required when {name} is a function of a token range")
        rows, n = t, num_tokens
    else:
        if num_tokens is not None and num_tokens != t.shape[1]:
            raise ValueError(f"num_keys={num_tokens} does not match {name}'s {t.shape[1]} tokens")
        rows, n = (lambda a, b: t[:, a:b]), t.shape[1]  # noqa: E731
    if n == 0:
        raise ValueError("at least one key token is needed")
    return rows, n, rows(0, 1)


def stack_chunks(fn: Callable[[int, int], Tensor], num_tokens: int, step: int) -> Tensor:
    """``out[:, a:b] = fn(a, b)`` over ``[a, b)`` chunks of ``step`` tokens (the last one shorter).

    ``fn`` returns ``[B, b − a, ...]``; one chunk returns ``fn(0, num_tokens)`` itself (:func:`stack_ranges`).
    """
    if num_tokens <= step:
        return fn(0, num_tokens)
    return stack_ranges(fn, ((a, min(a + step, num_tokens)) for a in range(0, num_tokens, step)), num_tokens)


def stack_chunks_into(fn: Callable[[int, int], Tensor], num_tokens: int, step: int, out: Tensor, lag: int) -> Tensor:
    """:func:`stack_chunks` into ``out [B, num_tokens, ...]``, a buffer that ``fn`` may also read: ``fn(a, b)`` may
    read the rows ``a − lag`` onwards of ``out`` as they were before the call (say, the values a convolution of the
    range reads), so each chunk's result is held back until no later chunk reads its rows. Without autograd; only
    the results of about ``lag / step + 1`` chunks are held at a time. Returns ``out``."""
    pending: List[Tuple[int, int, Tensor]] = []
    for a in range(0, num_tokens, step):
        while pending and pending[0][1] <= a - lag:  # rows no chunk from a on reads
            a0, b0, part = pending.pop(0)
            out[:, a0:b0] = part
        b = min(a + step, num_tokens)
        pending.append((a, b, fn(a, b)))
    for a0, b0, part in pending:
        out[:, a0:b0] = part
    return out


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
