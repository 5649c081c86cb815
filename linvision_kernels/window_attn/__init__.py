"""Circular-window softmax attention over a 2-D token grid with global prefix tokens and pooled tokens (CLEAR).

The operator of CLEAR (arXiv 2412.16112; ``Huage001/CLEAR: attention_processor.py::init_local_mask_flex``,
``::init_local_downsample_mask_flex``), evaluated per call for any resolution: no mask cache, no globals.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..backend import resolve_backend
from ..chunks import stack_chunks
from ..linear_attn.naive import chunk_tokens
from ..validation import check_4d, check_float, check_hw, check_int, check_qkv, check_triton_dtype
from .naive import window_attention_blocked, window_attention_dense, window_mask


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hw: Tuple[int, int],
    *,
    radius: int,
    num_prefix_tokens: int = 0,
    pooled_k: Optional[Tensor] = None,
    pooled_v: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    output: Optional[Callable[[int, int, Tensor], Tensor]] = None,
) -> Tensor:
    """Softmax attention restricted to an open disc of radius ``r`` on the image grid, plus global tokens.

    Shapes: ``q, k [B, N, H, Dk]``, ``v [B, N, H, Dv]`` with ``N = T + h·w``: ``T = num_prefix_tokens``
    prefix (class / register / text) tokens first, then the ``h×w`` image tokens in raster order.
    ``pooled_k [B, P, H, Dk]``, ``pooled_v [B, P, H, Dv]``: optional extra keys/values (CLEAR's
    learnably pooled tokens, see :func:`pool_tokens`), appended after the ``N`` keys. Returns
    ``o [B, N, H, Dv]``, ``o_i = Σ_j softmax_j(scale·q_i·k_j) v_j`` over the allowed ``j``:

    - image query at ``(y, x)``: every prefix key; image keys at ``(y', x')`` with
      ``(y−y')² + (x−x')² < r²`` (strict; no wrap-around); every pooled key;
    - prefix query: every prefix and image key, **no** pooled key (CLEAR's text rows).

    ``radius``: integer ``r ≥ 1`` (``r = 1`` keeps only the token itself). ``scale``: default
    ``Dk^-½``; CLEAR's proportional-attention scale is the caller's (see ``linvision.mixers.clear``).
    The pooled tokens carry no position: every image query sees all of them, so no grid is needed here.

    Cost: image queries ``O(h·w·(πr² + T + P)·D)``, prefix queries ``O(T·N·D)``. The Triton backend
    tiles image queries as 2-D patches and visits only the key patches that can meet the disc of some
    query of the patch (:func:`key_tiles_per_query_tile`), so its work per image token does not grow
    with the image. Accumulation in fp32 (fp64 on the torch backend for fp64 inputs); output in the
    input dtype. ``backend``: ``"auto"`` (Triton for CUDA tensors, else the blocked PyTorch
    reference), ``"torch"``, ``"triton"``. Differentiable in q, k, v, pooled_k, pooled_v.

    ``output(a, b, o)``: a token-wise epilogue (the caller's mixing and projection) applied to each range of
    output rows ``o [B, b − a, H, Dv]``; the result is then the stacked ``output`` results ``[B, N, ...]``. On the
    PyTorch path the rows are handed over as they are computed, so the attention output is never held whole.
    """
    hw, radius, T, scale = _validated(q, k, v, hw, radius, num_prefix_tokens, pooled_k, pooled_v, scale)
    if pooled_k is not None and pooled_k.shape[1] == 0:
        pooled_k = pooled_v = None
    tensors = [t for t in (q, k, v, pooled_k, pooled_v) if t is not None]
    chosen = resolve_backend(backend, *tensors)
    if chosen == "triton" and backend == "auto" and q.dtype == torch.float64:
        chosen = "torch"  # the kernels take fp16/bf16/fp32; auto falls back to the reference for fp64
    if chosen == "triton":
        check_triton_dtype(q)
        from .triton import window_attention_triton

        o = window_attention_triton(q, k, v, hw, radius, T, pooled_k, pooled_v, scale)
        return o if output is None else stack_chunks(lambda a, b: output(a, b, o[:, a:b]), o.shape[1], chunk_tokens(o))
    return window_attention_blocked(q, k, v, hw, radius, T, pooled_k, pooled_v, scale, output=output)


def pool_tokens(
    x: Tensor, hw: Tuple[int, int], factor: int, weight: Optional[Tensor] = None, num_prefix_tokens: int = 0
) -> Tensor:
    """CLEAR's pooled tokens: a weighted ``f×f`` sum over the image tokens of ``x [B, T + h·w, H, D]``.

    ``out[b, (i, j)] = Σ_{a,c<f} weight[a, c] · x[b, T + (i·f + a)·w + (j·f + c)]`` → ``[B, (h/f)(w/f), H, D]``
    in raster order of the pooled grid. ``weight``: any tensor of ``f²`` elements read as ``[f, f]``
    (rows, columns), e.g. the official ``spatial_weight`` of shape ``(1, 1, 1, f, 1, f, 1)``; default
    ``1/f²`` (average pooling, the official initial value). ``h`` and ``w`` must be multiples of ``f``.
    Differentiable in ``x`` and ``weight``.
    """
    h, w = check_hw(hw)
    factor = check_int("factor", factor, min=1)
    if h % factor or w % factor:
        raise ValueError(f"the pooling factor {factor} must divide the grid hw={h}x{w}")
    check_4d(x=x)
    T = check_int("num_prefix_tokens", num_prefix_tokens, min=0)
    B, N, H, D = x.shape
    if N != T + h * w:
        raise ValueError(f"token count {N} does not match hw={h}x{w} plus {T} prefix tokens (= {T + h * w})")
    if weight is None:
        weight = x.new_full((factor, factor), 1.0 / (factor * factor))
    elif not isinstance(weight, Tensor) or weight.numel() != factor * factor:
        raise ValueError(f"weight must hold factor² = {factor * factor} elements, got {getattr(weight, 'shape', weight)}")
    weight = weight.reshape(factor, factor).to(x.dtype)
    img = x[:, T:].reshape(B, h // factor, factor, w // factor, factor, H, D)
    pooled = torch.einsum("bpaqchd,ac->bpqhd", img, weight)
    return pooled.reshape(B, (h // factor) * (w // factor), H, D)


def key_tiles_per_query_tile(
    hw: Tuple[int, int],
    radius: int,
    query_tile: Optional[Tuple[int, int]] = None,
    key_tile: Optional[Tuple[int, int]] = None,
) -> Tensor:
    """Image-key tiles the Triton forward visits for each image-query tile (raster order of tiles).

    Mirrors the kernel's loop bounds on the host; tiles default to the Triton backend's choice for
    a GPU. The count of an interior query tile depends on ``radius`` and the tile shapes only, not on
    ``hw``: the work per image token is independent of the image size. Prefix and pooled keys
    are visited by every tile in addition (``ceil(T / BLOCK_N) + ceil(P / BLOCK_N)`` blocks).
    """
    from .tiles import default_tiles, visited_key_tiles

    h, w = check_hw(hw)
    radius = check_int("radius", radius, min=1)
    qt, kt = default_tiles(interpreting=False)
    return torch.tensor(visited_key_tiles((h, w), radius, query_tile or qt, key_tile or kt), dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------


def _validated(q, k, v, hw, radius, num_prefix_tokens, pooled_k, pooled_v, scale):
    h, w = check_hw(hw)
    radius = check_int("radius", radius, min=1)
    T = check_int("num_prefix_tokens", num_prefix_tokens, min=0)
    check_qkv(q, k, v)
    B, N, H, Dk = q.shape
    if N != T + h * w:
        raise ValueError(f"token count {N} does not match hw={h}x{w} plus {T} prefix tokens (= {T + h * w})")
    if (pooled_k is None) != (pooled_v is None):
        raise ValueError("pooled_k and pooled_v must be given together")
    if pooled_k is not None:
        for name, t in (("pooled_k", pooled_k), ("pooled_v", pooled_v)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor [B, P, H, D]")
            if t.dtype != q.dtype:
                raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        P = pooled_k.shape[1]
        if pooled_k.shape != (B, P, H, Dk) or pooled_v.shape != (B, P, H, v.shape[3]):
            raise ValueError(
                f"pooled_k {tuple(pooled_k.shape)} / pooled_v {tuple(pooled_v.shape)} must be "
                f"[B, P, H, Dk] = [{B}, P, {H}, {Dk}] / [B, P, H, Dv] = [{B}, P, {H}, {v.shape[3]}]"
            )
    scale = 1.0 / math.sqrt(Dk) if scale is None else check_float("scale", scale)
    return (h, w), radius, T, scale


__all__ = [
    "key_tiles_per_query_tile",
    "pool_tokens",
    "window_attention",
    "window_attention_blocked",
    "window_attention_dense",
    "window_mask",
]
