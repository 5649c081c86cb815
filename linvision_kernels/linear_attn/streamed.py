"""Linear attention whose feature maps are computed by the caller one chunk of tokens at a time.

A mixer whose features are a chain of elementwise ops (NaLaFormer's power kernel and RoPE, DyDiLA's
routed power kernel and differential, Hedgehog's softmax maps) would otherwise hold several full
``[B, N, H, D]`` temporaries: past the cache, and past the allocator's reuse threshold (every fresh
block is page-faulted again on every call), they make the cost per token grow with ``N``. Here the
caller passes functions of a token range ``[a, b)``; on the PyTorch path they are evaluated per chunk
of :func:`~linvision.kernels.linear_attn.naive.chunk_tokens` tokens, the chunking
``linear_attention_naive`` uses, so the key state is summed in the same order and the outputs are
bit-identical to ``linear_attention`` on the full features. On the Triton path the features are built
once over all tokens and passed to :func:`~linvision.kernels.linear_attn.linear_attention`.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from ..backend import resolve_backend
from ..chunks import Rows, stack_chunks, stack_chunks_into, token_source
from ..validation import check_bool, check_choice, check_float, check_optional, expand_floating
from . import _validated, linear_attention
from .feature_maps import FEATURE_MAPS
from .naive import chunk_tokens
from .state import apply_state, state_of

# (a, b) → (features of tokens a:b [B, b − a, H, Dk], denominator features [B, b − a, H, Dd] or None)
Features = Callable[[int, int], Tuple[Tensor, Optional[Tensor]]]


def linear_attention_streamed(
    queries: Features,
    keys: Features,
    v: Union[Tensor, Rows],
    num_queries: int,
    *,
    num_keys: Optional[int] = None,
    k_weight: Optional[Tensor] = None,
    v_weight: Optional[Tensor] = None,
    normalize: str = "div",
    mean: bool = False,
    eps: float = 1e-6,
    scale: Optional[float] = None,
    feature_map: Optional[str] = None,
    feature_offset: float = 0.0,
    output: Optional[Callable[[int, int, Tensor], Tensor]] = None,
    out: Optional[Tensor] = None,
    out_lag: int = 0,
    backend: str = "auto",
) -> Tensor:
    """``linear_attention(q, k, v, q_den=, k_den=, ...)`` with ``q, q_den = queries(0, N)`` and
    ``k, k_den = keys(0, M)``, never holding more than one chunk of features on the PyTorch path.

    ``v [B, M, H, Dv]``, or a function ``v(a, b)`` of a token range returning ``v[:, a:b]`` (with ``num_keys = M``:
    then the values are never held whole either); returns ``[B, N, H, Dv]`` (``N = num_queries``) in the dtype of
    the query features. ``queries``/``keys`` must return the same tensors for a range as for the whole
    sequence sliced to it (features computed token by token). ``feature_map`` (``"relu"``, ``"elu+1"``
    or None) and ``feature_offset`` are applied to what they return, and ``k_weight``/``v_weight``
    (broadcastable to ``[B, M, H]``), ``normalize``, ``mean``, ``eps``, ``scale`` act, as in ``linear_attention``.

    ``output(a, b, o)``: applied to each chunk ``o [B, b − a, H, Dv]`` of the attention output (token-wise:
    the caller's epilogue, e.g. local term and projection), so that the attention output is never held
    whole; the result is then the stacked ``output`` chunks ``[B, N, ...]``.

    ``out``: a ``[B, N, ...]`` buffer the ``output`` chunks are written into and returned, which ``output`` may read
    too (rows from ``out_lag`` tokens before its range on, e.g. the values of a depthwise convolution held in it),
    so that the result needs no allocation of its own (:func:`~linvision.kernels.chunks.stack_chunks_into`; not
    under autograd).
    """
    epilogue = (lambda a, b, o: o) if output is None else output  # noqa: E731
    values, M, sample = token_source(v, num_keys)  # sample: the first value token, [B, 1, H, Dv]
    if resolve_backend(backend, sample) == "triton":
        v = values(0, M)
        q, q_den = queries(0, num_queries)
        k, k_den = keys(0, M)
        o = linear_attention(
            q, k, v, q_den=q_den, k_den=k_den, k_weight=k_weight, v_weight=v_weight, normalize=normalize, mean=mean,
            eps=eps, scale=scale, feature_map=feature_map, feature_offset=feature_offset, backend=backend,
        )
        if output is None:
            return o
        return _stacked(lambda a, b: output(a, b, o[:, a:b]), num_queries, chunk_tokens(v), out, out_lag)
    check_bool("mean", mean)
    eps = check_float("eps", eps, min=0.0)
    feature_map = check_optional(check_choice, "feature_map", feature_map, tuple(FEATURE_MAPS))
    maps = dict(feature_map=feature_map, feature_offset=check_float("feature_offset", feature_offset, min=0.0))
    B, H = sample.shape[0], sample.shape[2]
    weights = [None if w is None else expand_floating(name, w, (B, M, H), f"[B, M, H] = [{B}, {M}, {H}]")
               for name, w in (("k_weight", k_weight), ("v_weight", v_weight))]
    rows = lambda t, a, b: None if t is None else t[:, a:b]  # noqa: E731
    step = chunk_tokens(sample)
    first_q, first_qd = queries(0, min(step, num_queries))
    state = None
    for a in range(0, M, step):
        k, k_den = keys(a, a + step)
        kw, vw = (rows(w, a, a + step) for w in weights)
        vc = values(a, a + k.shape[1])
        if a == 0:  # linear_attention's checks, once, on the first chunk of each side
            scale = _validated(first_q, k, vc, first_qd, k_den, kw, vw, normalize, scale)[-1]
        part = state_of(k, vc, k_den, kw, vw, **maps)
        state = part if state is None else state + part

    def chunk(a: int, b: int) -> Tensor:
        q, q_den = (first_q, first_qd) if a == 0 else queries(a, b)
        return epilogue(a, b, apply_state(q, state, q_den, normalize, mean, eps, scale, **maps))

    return _stacked(chunk, num_queries, step, out, out_lag)


def _stacked(fn: Callable[[int, int], Tensor], num_tokens: int, step: int, out: Optional[Tensor], lag: int) -> Tensor:
    if out is None:
        return stack_chunks(fn, num_tokens, step)
    if torch.is_grad_enabled() and out.requires_grad:
        raise ValueError("out= writes in place: not for a tensor autograd records")
    if out.shape[1] != num_tokens:
        raise ValueError(f"out has {out.shape[1]} tokens, the queries {num_tokens}")
    return stack_chunks_into(fn, num_tokens, step, out, lag)
