"""Per-token work in chunks of tokens, so that its temporaries stay cache-sized.

A chain of per-token ops over ``(B, N, C)`` (add, norm, gate, output projection) evaluated on the
whole sequence allocates a full-size temporary per op. Past the cache, and past the allocator's
reuse threshold (glibc hands blocks over 32 MiB back to the system, so each is page-faulted again on
every call), that makes the cost per token grow with ``N``. The same chain run on chunks of about
:data:`CHUNK_ELEMENTS` elements writes one output and keeps everything else in cache. Every op in the
chain must act token by token (no reduction across tokens), so the result does not depend on the
chunking beyond the rounding of matrix products.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.chunks import stack_chunks

# (a, b) → the rows a:b of a per-token tensor, [B, b − a, ...]
TokenRows = Callable[[int, int], Tensor]

CHUNK_ELEMENTS = 1 << 18  # elements of one [B, chunk, C] temporary (1 MiB in fp32)


def chunk_tokens(batch, channels: int) -> int:
    """Tokens per chunk for ``[batch, ·, channels]`` rows: about :data:`CHUNK_ELEMENTS` elements, at least 64.

    A symbolic batch (``torch.export`` with a dynamic batch) counts as one sample, so the chunking never
    depends on it.
    """
    per_batch = batch if isinstance(batch, int) else 1
    return max(64, CHUNK_ELEMENTS // max(1, per_batch * channels))


def map_token_chunks(fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """``fn(*tensors)`` evaluated on chunks of tokens: ``out[:, a:b] = fn(*(t[:, a:b] for t in tensors))``.

    ``tensors``: ``[B, N, ...]`` each (same ``B`` and ``N``); ``fn`` must be token-wise and return
    ``[B, b − a, ...]``. The chunk size follows the widest input's row. Chunks are handed over contiguous (a
    chunk of a batch is strided, and ``F.linear`` on a strided 3-D input adds its bias in a second rounding).
    """
    B, N = tensors[0].shape[:2]
    row = max(math.prod(t.shape[2:]) for t in tensors)
    step = chunk_tokens(B, row)
    if N > step and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        # autograd: split (its backward is one cat) and cat, never a slice or slice write per chunk, each of
        # whose backwards would touch the whole tensor
        return torch.cat([fn(*(p.contiguous() for p in parts)) for parts in zip(*(t.split(step, 1) for t in tensors))], 1)
    return map_token_ranges(lambda a, b: fn(*(t[:, a:b].contiguous() for t in tensors)), B, N, row)


def map_token_ranges(fn: Callable[[int, int], Tensor], batch: int, num_tokens: int, row: int) -> Tensor:
    """``out[:, a:b] = fn(a, b)`` over chunks ``[a, b)`` of ``num_tokens`` tokens, sized for rows of ``row``
    elements (:func:`chunk_tokens`); ``fn`` returns ``[batch, b − a, ...]`` and must act token by token."""
    return stack_chunks(fn, num_tokens, chunk_tokens(batch, row))


def token_rows(fn: Callable[[Tensor], Tensor], x: Tensor) -> TokenRows:
    """``(a, b) → fn(x)[:, a:b]`` for a token-wise ``fn`` of ``x [B, N, ...]`` (a projection, a feature map).

    ``fn`` runs on each range alone (``x[:, a:b]``, contiguous), so its whole output is never held, unless autograd
    records ``x``: then ``fn(x)`` runs once and is sliced (a slice of ``x`` per range would make the backward build a
    whole-size gradient of ``x`` per range). Each range should be asked for once: it is recomputed on every call.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        whole = fn(x)
        return lambda a, b: whole[:, a:b]
    return lambda a, b: fn(x[:, a:b].contiguous())


def token_chunk_outputs(fn: Callable[[Tensor], Tensor], x: Tensor, step: int) -> Iterator[Tensor]:
    """``fn(x)[:, a:a + step]`` for ``a = 0, step, 2·step, …``, in order, for a token-wise ``fn`` of ``x [B, N, ...]``.

    ``fn`` runs on each chunk alone, so its whole output is never held, unless autograd records ``x``: then
    ``fn(x)`` runs once and is split (the backward of a split is one concatenation; a slice per chunk would make
    each chunk's backward a whole-size gradient).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        yield from fn(x).split(step, 1)
        return
    for a in range(0, x.shape[1], step):
        yield fn(x[:, a:a + step].contiguous())


def linear_rows(linear: nn.Module, x: Tensor, parts: int = 1) -> Tuple[TokenRows, ...]:
    """``linear(x)`` cut into ``parts`` equal slices of its output features, each a function of a token range:
    the ``i``-th is ``(a, b) → linear(x)[:, a:b, i·F/parts : (i+1)·F/parts]`` (``F`` output features).

    A plain ``nn.Linear`` runs per range on the rows of its weight that each slice needs (:func:`token_rows`),
    so its whole output is never held. Any other module (an adapter-wrapped linear), or ``x`` recorded by
    autograd: ``linear(x)`` runs once and is sliced.
    """
    if type(linear) is not nn.Linear or (torch.is_grad_enabled() and x.requires_grad):
        whole = linear(x).chunk(parts, -1)
        return tuple((lambda a, b, t=t: t[:, a:b]) for t in whole)
    biases = (None,) * parts if linear.bias is None else linear.bias.chunk(parts)
    return tuple(token_rows(lambda t, w=w, b=b: F.linear(t, w, b), x) for w, b in zip(linear.weight.chunk(parts), biases))


def reusable_output(values: Tensor, x: Tensor, lag: int) -> dict:
    """``{"out": buffer, "out_lag": lag}`` for ``linear_attention_streamed`` when the values ``[B, N, H, D]`` are a
    buffer of their own shaped like the mixer output ``x (B, N, C)`` (contiguous, same dtype) and autograd does not
    record them: the outputs then go into it, with no allocation of their own; else ``{}``."""
    buf = values.flatten(2)
    recorded = torch.is_grad_enabled() and buf.requires_grad
    if buf.shape != x.shape or buf.dtype != x.dtype or not buf.is_contiguous() or recorded:
        return {}
    return {"out": buf, "out_lag": lag}


def map_token_windows(fn: Callable[[int, int], Tensor], x: Tensor, num_tokens: int, row: int) -> Tensor:
    """:func:`map_token_ranges` for an ``fn(a, b)`` that reads rows of ``x [B, N, ...]`` around its range (a
    convolution's halo): in chunks unless autograd records ``x``, then one call ``fn(0, num_tokens)`` (the windows
    overlap, so they cannot be split; a slice of ``x`` per chunk would make the backward build a whole-size
    gradient of ``x`` per chunk)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return fn(0, num_tokens)
    return map_token_ranges(fn, x.shape[0], num_tokens, row)
