"""LoLCATs: softmax attention inside a 2-D window plus Hedgehog linear attention outside it, one normaliser.

Paper: "LoLCATs: On Low-Rank Linearizing of Large Language Models" (Zhang et al., ICLR 2025, arXiv 2410.10254).
Official code: HazyResearch/lolcats ``src/model/linear_attention/linear_window_attention_tk.py``
(``hybrid_attention_quadratic``, ``LolcatsTKWindowAttention``), feature map ``src/model/feature_map.py``.
"""
from __future__ import annotations

import math
import operator
from functools import reduce
from itertools import repeat
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from ..kernels.chunks import stack_ranges
from ..kernels.linear_attn.naive import chunk_tokens
from ..kernels.linear_attn.state import state_of
from ..kernels.validation import check_bool, check_choice, check_float, check_int
from .base import QKVMixer
from .hedgehog import FORMS, HedgehogFeatureMap
from .rotary import Rotation
from .token_chunks import map_token_chunks
from .window2d import SHAPES, shifted, window_offsets, window_rows

# σ(−2.1972…) = 0.1: the ``init_window_factor`` of every ``*_w01`` LoLCATs config.
INIT_WINDOW_FACTOR = -2.1972245773362196


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def hybrid_rows(q: Tensor, k: Tensor, fq: Tensor, fk: Tensor, hw: Tuple[int, int], num_prefix_tokens: int,
                window_factor: Tensor, linear_factor, shape: str, radius: int, start: int, stop: int,
                rfq: Optional[Tensor] = None, rfk: Optional[Tensor] = None) -> Tensor:
    """The hybrid attention weights of query rows ``start:stop`` against all keys, ``[B, H, n, N]`` (dense rows).

    ``a_ij = (w·exp(s_ij − m_i)·[j ∈ W_i] + l·φ(q_i)·φ(k_j)·[j ∉ W_i]) / Σ_j (same)``, ``s = q·k/√D``,
    ``m_i = max_{j ∈ W_i} s_ij``, ``w = window_factor [H]``, ``l = linear_factor`` (a number or ``[H]``): the official
    ``hybrid_attention_quadratic`` with the causal terraced mask replaced by the 2-D window ``W_i``
    (:func:`linvision.mixers.window2d.window_rows`). The oracle of :func:`hybrid_attention`.
    ``rfq, rfk``: rotated features (RoPE): the linear terms of the numerator use them, the normaliser
    keeps ``fq, fk`` (RoFormer's linear form, :mod:`linvision.mixers.rotary`).
    """
    acc = _acc(q)
    mask = window_rows(hw, num_prefix_tokens, shape, radius, start, stop, q.device)
    s = torch.einsum("bnhd,bmhd->bhnm", q[:, start:stop].to(acc), k.to(acc)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    wf = window_factor.to(acc).reshape(1, -1, 1, 1)
    a_sm = wf * torch.exp(s - s.amax(-1, keepdim=True))
    a_ln = torch.einsum("bnhf,bmhf->bhnm", fq[:, start:stop].to(acc), fk.to(acc)).masked_fill(mask, 0.0)
    lf = linear_factor.to(acc).reshape(1, -1, 1, 1) if isinstance(linear_factor, Tensor) else linear_factor
    a = a_sm + lf * a_ln
    if rfq is None:
        return a / a.sum(-1, keepdim=True)
    r_ln = torch.einsum("bnhf,bmhf->bhnm", rfq[:, start:stop].to(acc), rfk.to(acc)).masked_fill(mask, 0.0)
    return (a_sm + lf * r_ln) / a.sum(-1, keepdim=True)


BAND_TOKENS = 1024  # image queries per band of grid rows: keeps the per-offset temporaries cache-sized


def _image_band(qg: Tensor, fqg: Tensor, rfqg: Optional[Tensor], k_pre: Tensor, v_pre: Tensor, state: Tensor, z: Tensor,
                views, wf: Tensor, lf, scale: float) -> Tensor:
    """Outputs ``[B, r, w, H, Dv]`` of a band of ``r`` grid rows of image queries ``qg [B, r, w, H, D]``.

    ``views``: per window offset ``(k, valid [r, w], φ(k), v, rφ(k))`` of the band's shifted keys and values;
    ``rfqg``, ``rφ(k)``: the features of the numerator (rotated with RoPE; else ``rfqg = None`` and
    ``rφ(k)`` is ``φ(k)``); ``k_pre, v_pre [B, T, H, *]`` the prefix keys and values; ``state [B, H, F, Dv]``
    (of the numerator's features), ``z [B, H, F]`` the global linear state and normaliser of the image keys.
    """
    T = k_pre.shape[1]
    rotated = rfqg is not None
    rfqg = rfqg if rotated else fqg
    lf_v = lf[:, None] if isinstance(lf, Tensor) else lf  # against [..., H, K] and [..., H, Dv]
    scores, lin, rlin = [], [], []
    for k_o, valid, fk_o, _, rfk_o in views:
        inside = valid[None, :, :, None]
        scores.append(((qg * k_o).sum(-1) * scale).masked_fill(~inside, float("-inf")))
        lin.append((fqg * fk_o).sum(-1).masked_fill(~inside, 0.0))
        if rotated:
            rlin.append((rfqg * rfk_o).sum(-1).masked_fill(~inside, 0.0))
    scores, lin = torch.stack(scores, -1), torch.stack(lin, -1)  # [B, r, w, H, K]
    rlin = torch.stack(rlin, -1) if rotated else lin
    m = scores.amax(-1)
    if T:
        s_pre = torch.einsum("byxhd,bthd->byxht", qg, k_pre) * scale
        m = torch.maximum(m, s_pre.amax(-1))
        e_pre = wf[:, None] * torch.exp(s_pre - m[..., None])
    e_win = wf[:, None] * torch.exp(scores - m[..., None])
    coef = e_win - lf_v * rlin
    num = lf_v * torch.einsum("byxhf,bhfv->byxhv", rfqg, state)
    den = e_win.sum(-1) + lf * (torch.einsum("byxhf,bhf->byxh", fqg, z) - lin.sum(-1))
    for i, (_, _, _, v_o, _) in enumerate(views):
        num = num + coef[..., i, None] * v_o
    if T:
        num = num + torch.einsum("byxht,bthv->byxhv", e_pre, v_pre)
        den = den + e_pre.sum(-1)
    return num / den[..., None]


def hybrid_attention(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, hw: Tuple[int, int],
                     num_prefix_tokens: int, window_factor: Tensor, linear_factor, shape: str, radius: int,
                     rfq: Optional[Tensor] = None, rfk: Optional[Tensor] = None,
                     output: Optional[Callable[[int, int, Tensor], Tensor]] = None) -> Tensor:
    """``o [B, N, H, Dv]`` of the weights of :func:`hybrid_rows`, in ``O(N·(|W| + T)·D + N·F·Dv)``.

    Shapes: ``q, k [B, N, H, D]``, ``v [B, N, H, Dv]``, ``fq, fk [B, N, H, F]`` with ``N = T + h·w``.
    Image queries: softmax terms over the window's image keys (shifted views) and all prefix keys; the
    linear part outside the window is the global state ``Σ_j φ(k_j) v_jᵀ`` minus the window's own terms.
    Prefix queries: their window is every key, so they get exact softmax attention. fp32 (fp64 for fp64).
    ``rfq, rfk`` (both or neither): the numerator's linear features (RoPE-rotated), as in :func:`hybrid_rows`.

    Order of the computation: the global state is summed over chunks of image tokens, then the image queries
    go by bands of grid rows, each against shifted views of a padded copy of only the key rows it reaches. So
    no temporary grows past a band. ``output(a, b, o)``: a token-wise epilogue applied to the output rows
    ``a:b`` as they are computed (the prefix rows, then each band); the result is then the stacked ``output``
    results ``[B, N, ...]`` and ``o`` is never held whole.
    """
    acc = _acc(q)
    B, N, H, D = q.shape
    h, w = hw
    T = num_prefix_tokens
    q, k, v, fq, fk = (t.to(acc) for t in (q, k, v, fq, fk))
    rfq, rfk = (fq, fk) if rfq is None else (rfq.to(acc), rfk.to(acc))
    epilogue = (lambda a, b, o: o) if output is None else output  # noqa: E731
    scale = 1.0 / math.sqrt(D)
    offsets = window_offsets(shape, radius)
    wf = window_factor.to(acc)  # [H]
    lf = linear_factor.to(acc) if isinstance(linear_factor, Tensor) else linear_factor  # [H] or a number
    qg = q[:, T:].reshape(B, h, w, H, D)
    fqg = fq[:, T:].reshape(B, h, w, H, fq.shape[-1])  # sizes given: B may be 0
    rfqg = None if rfq is fq else rfq[:, T:].reshape(B, h, w, H, fq.shape[-1])
    k_img, fk_img, v_img = k[:, T:], fk[:, T:], v[:, T:]
    rfk_img = None if rfk is fk else rfk[:, T:]
    step = chunk_tokens(v_img)  # state = Σ rφ(k) vᵀ, z = Σ φ(k) over the image keys, chunk by chunk
    parts = (state_of((fk_img if rfk_img is None else rfk_img)[:, a : a + step], v_img[:, a : a + step],
                      fk_img[:, a : a + step]) for a in range(0, h * w, step))
    key_state = reduce(operator.add, parts)
    state, z = key_state.kv, key_state.k_sum  # [B, H, F, Dv], [B, H, F]
    rows = max(1, BAND_TOKENS // w)

    def band(a: int, b: int) -> Tensor:
        """Outputs ``[B, (b − a)·w, H, Dv]`` of the image queries of grid rows ``a:b``."""
        views = [shifted(t, hw, offsets, (a, b)) for t in (k_img, fk_img, v_img)]
        views.append(repeat((None, None)) if rfk_img is None else shifted(rfk_img, hw, offsets, (a, b)))
        band_views = [(k_o, valid, fk_o, v_o, fk_o if rfk_o is None else rfk_o)
                      for (k_o, valid), (fk_o, _), (v_o, _), (rfk_o, _) in zip(*views)]
        rfq_band = None if rfqg is None else rfqg[:, a:b]
        o = _image_band(qg[:, a:b], fqg[:, a:b], rfq_band, k[:, :T], v[:, :T], state, z, band_views, wf, lf, scale)
        return o.reshape(B, (b - a) * w, H, v.shape[-1])

    def prefix() -> Tensor:
        """Outputs ``[B, T, H, Dv]`` of the prefix queries: softmax over every key."""
        s = torch.einsum("bthd,bnhd->bhtn", q[:, :T], k) * scale
        return torch.einsum("bhtn,bnhv->bthv", s.softmax(-1), v)

    def rows_of(a: int, b: int) -> Tensor:
        return epilogue(a, b, prefix() if a < T else band((a - T) // w, (b - T) // w))

    ranges = [(0, T)] if T else []
    ranges += [(T + a * w, T + min(a + rows, h) * w) for a in range(0, h, rows)]
    return stack_ranges(rows_of, ranges, N)


class LolcatsAttention(QKVMixer):
    """Bidirectional 2-D LoLCATs attention: softmax in a window ``W_i`` around each image token, Hedgehog
    linear attention over every other token, combined with one shared normaliser (see :func:`hybrid_rows`).

    Options: ``window`` ``"disc"`` (CLEAR's open disc ``dy² + dx² < r²``) or ``"square"`` (``|dy|, |dx| < r``),
    ``radius`` ``r``; the window factor ``σ(window_factors[h])`` per head, initialised at
    ``init_window_factor`` (``−2.1972``: σ = 0.1, the ``w01`` configs); ``affine_factors``: the linear
    part is scaled by ``1 − σ`` instead of 1 (official ``affine_attention_factors``, false in the configs);
    ``feature_dim``, ``form``: the Hedgehog maps on q and k (``softmax``, ``feature_dim = head_dim`` as
    ``lk_smd_fd64``). Prefix tokens are in every image token's window; prefix queries attend to every
    token with plain softmax.

    A teacher's q/k norms (:meth:`carry_qk_norm`) act on q and k first; a teacher's RoPE (``rope``,
    EVA02 / RoPE ViTs) rotates q, k of the softmax terms as the teacher does and the features of the
    linear terms in the numerator only (RoFormer's linear form, :mod:`linvision.mixers.rotary`; the
    shared normaliser's linear terms stay unrotated).

    Deviations from the official module: bidirectional, and the causal 1-D "terraced" window of 64 tokens
    becomes a 2-D window on the image grid; its own RoPE is not reproduced (a ViT teacher brings its
    absolute positions or its own RoPE, which is then applied as above); feature maps start at
    the identity (the configs' ``zero_init: false`` draws Kaiming-uniform ``W`` without bias). The whole
    thing runs in PyTorch (fp32) with shifted views, ``O(N·(|W| + T))`` memory, no ``N × N`` matrix.
    """

    supports_rope = True
    supports_qk_norm = True

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 window: str = "disc", radius: int = 5, init_window_factor: float = INIT_WINDOW_FACTOR,
                 affine_factors: bool = False, feature_dim: Optional[int] = None, form: str = "softmax",
                 feature_bias: bool = True):
        super().__init__(dim, num_heads, check_bool("qkv_bias", qkv_bias), check_bool("proj_bias", proj_bias))
        self.window = check_choice("window", window, SHAPES)
        self.radius = check_int("radius", radius, min=1)
        init = check_float("init_window_factor", init_window_factor)
        self.affine_factors = check_bool("affine_factors", affine_factors)
        check_choice("form", form, FORMS)
        self.window_factors = nn.Parameter(torch.full((num_heads,), init))
        check_bool("feature_bias", feature_bias)
        self.feature_map_q = HedgehogFeatureMap(num_heads, self.head_dim, feature_dim, form, feature_bias)
        self.feature_map_k = HedgehogFeatureMap(num_heads, self.head_dim, feature_dim, form, feature_bias)

    def factors(self) -> Tuple[Tensor, object]:
        """``(σ(window_factors) [H], linear factor)``: the linear factor is 1, or ``1 − σ`` when affine; fp32
        (fp64 in an fp64 module)."""
        wf = torch.sigmoid(self.window_factors.to(_acc(self.window_factors)))
        return wf, (1 - wf if self.affine_factors else 1.0)

    def _features(self, x: Tensor, num_prefix_tokens: int, rope: Optional[Rotation]):
        """``(q, k, v, φq, φk, rφq, rφk)``: q, k rotated and ``rφ`` the rotated features with ``rope``, else
        ``rφ = None`` and q, k as projected. ``φq, φk`` are views of one buffer filled in chunks of tokens."""
        q, k, v = self.project_qkv(x)
        f = map_token_chunks(lambda q, k: torch.cat([self.feature_map_q(q), self.feature_map_k(k)], -1), q, k)
        fq, fk = f.split(2 * self.feature_map_q.feature_dim, -1)
        if rope is None:
            return q, k, v, fq, fk, None, None
        T = num_prefix_tokens
        return rope.apply(q, T), rope.apply(k, T), v, fq, fk, rope.apply(fq, T), rope.apply(fk, T)

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int, rope: Optional[Rotation] = None) -> Tensor:
        q, k, v, fq, fk, rfq, rfk = self._features(x, num_prefix_tokens, rope)
        wf, lf = self.factors()
        return hybrid_attention(q, k, v, fq, fk, hw, num_prefix_tokens, wf, lf, self.window, self.radius, rfq, rfk,
                                output=lambda a, b, o: self.proj(o.to(x.dtype).flatten(2)))

    def attention_rows(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int, rope: Optional[Rotation] = None
                       ) -> Tuple[Tensor, Tensor, Callable[[int, int], Tensor]]:
        """``(q, k, rows)`` for attention transfer: ``rows(a, b)`` = :func:`hybrid_rows` of rows ``a:b``
        (``q, k`` rotated with ``rope``, the teacher's)."""
        q, k, _, fq, fk, rfq, rfk = self._features(x, num_prefix_tokens, rope)
        wf, lf = self.factors()
        return q, k, lambda a, b: hybrid_rows(q, k, fq, fk, hw, num_prefix_tokens, wf, lf, self.window,
                                              self.radius, a, b, rfq, rfk)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window!r}, radius={self.radius}, affine={self.affine_factors}"


__all__ = ["INIT_WINDOW_FACTOR", "LolcatsAttention", "hybrid_attention", "hybrid_rows"]
