"""Liger: gated linear attention whose gates come from the key projection (no new parameters), mixed with a
window of softmax attention.

Paper: "Liger: Linearizing Large Language Models to Gated Recurrent Structures" (Lan et al., ICML 2025,
arXiv 2503.01496). Official code: OpenSparseLLMs/Linearization @ 0b364eb
``liger/models/liger_gla/modeling_liger_gla.py`` (``LigerGatedLinearAttention.forward``).
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.backend import check_backend
from ..kernels.gated_recurrence import gated_scan
from ..kernels.validation import check_bool, check_choice, check_float, check_int
from ..kernels.window_attn import window_attention
from .base import QKVMixer
from .orders import BASE_ORDERS, ORDERS, order_index, scan_in_orders
from .token_chunks import map_token_chunks
from .window2d import window_rows

GATE_LOGIT_NORMALIZER = 16  # official: g = logsigmoid(pool(k)) / 16


def packed_gates(q: Tensor, k: Tensor, normalizer: float) -> Tensor:
    """``[φ(q), φ(k), g]`` packed along the last dim, ``[B, n, H, 3D]`` in fp32 (fp64 for fp64), token-wise in
    ``q, k [B, n, H, D]``: ``φ = softmax`` over the head dim and the per-channel log decay
    ``g = logsigmoid(k) / normalizer`` (the official gate, pooled from the raw key projection before its
    feature map)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(acc), k.to(acc)
    return torch.cat([q.softmax(-1), k.softmax(-1), F.logsigmoid(k) / normalizer], -1)


def liger_gates(q: Tensor, k: Tensor, normalizer: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(φ(q), φ(k), g)``, all ``[B, N, H, D]`` in fp32 (fp64 for fp64): the views of :func:`packed_gates`.
    Computed in chunks of tokens (one buffer, cache-sized temporaries)."""
    return map_token_chunks(lambda q, k: packed_gates(q, k, normalizer), q, k).split(q.shape[-1], -1)


def gated_rows(fq: Tensor, fk: Tensor, g: Tensor, hw: Tuple[int, int], num_prefix_tokens: int, order: str,
               start: int, stop: int) -> Tensor:
    """The weights of query rows ``start:stop`` of the bidirectional per-channel gated scan (scale 1) that
    :meth:`LigerAttention.mix` runs, ``[B, H, stop − start, N]``; inputs ``[B, N, H, D]``.

    In one base order, with ``G`` the inclusive cumulative sum of ``g`` along it: a key at or before the query
    weighs ``Σ_d fq_d fk_d exp(G_i − G_j)`` (forward half, diagonal included), a key after it
    ``Σ_d fq_d fk_d exp((G_j − g_j) − (G_i − g_i))`` (backward half); ``"cross"`` averages its two orders.
    Memory ``O(B · (stop − start) · N · H · D)``.
    """
    out = []
    for base in BASE_ORDERS[order]:
        idx = order_index(hw, base, num_prefix_tokens, g.device)
        pos = torch.argsort(idx)
        G = g.index_select(1, idx).cumsum(1).index_select(1, pos)
        Gex = G - g
        forward = pos[None, :] <= pos[start:stop, None]  # [n, N]: key j at or before query i in this order
        expo = torch.where(forward[None, :, :, None, None], G[:, start:stop, None] - G[:, None],
                           Gex[:, None] - Gex[:, start:stop, None])
        out.append(torch.einsum("bnhd,bmhd,bnmhd->bhnm", fq[:, start:stop], fk, expo.exp()))
    return out[0] if len(out) == 1 else sum(out) / len(out)


class LigerAttention(QKVMixer):
    """``o = window_mix · softmax-window(q, k, v) + (1 − window_mix) · GLA(φ(q), φ(k), v; g)``, bidirectional,
    2-D.

    Linear part (official): ``φ = softmax`` over the head dim of the raw ``q`` and ``k`` (``F.softmax(q, -1)``,
    ``F.softmax(k, -1)``), per-channel log decays ``g = logsigmoid(pool_g(k)) / 16`` with
    ``pool_g = AdaptiveAvgPool1d(H·D)`` of the key projection, scale 1, no normaliser, computed in fp32 — here on
    :func:`linvision.kernels.gated_scan` with ``direction="bidirectional"``. With as many key heads as query
    heads (every ViT) ``pool_g`` maps ``C`` channels to ``C``: it is the identity, so ``g`` is taken from ``k``
    itself and Liger adds no parameter; q/k/v/proj are inherited from softmax attention. Window part: softmax
    attention (scale ``D^-1/2``) in CLEAR's disc of ``radius`` on the image grid
    (:func:`linvision.kernels.window_attn.window_attention`; ``backend`` selects its kernel and the gated
    scan's), for the official 64-token causal sliding window. ``window_mix = 0.5`` is the official
    ``0.5 * y + 0.5 * o_``; ``window_mix = 0`` leaves gated linear attention alone. Order of the computation:
the gates (:func:`packed_gates`) are built in chunks of tokens into one buffer whose views feed the scan; the
window part then hands its output rows, as it computes them, to the mix with the scan's rows and to ``proj``
(no full-size window output or mixed temporary).

    Deviations from the official causal decoder: the recurrence ``S_t = diag(exp g_t) S_{t−1} + φ(k_t) v_tᵀ``,
    ``o_t = φ(q_t)ᵀ S_t`` runs in both directions along a 2-D ``order`` of the grid (:mod:`.orders`:
    ``"raster"`` by default, ``"column"``, or the ``"cross"`` mean of both), summed with the diagonal counted
    once (LION's ``L_f + L_b − I``), both halves sharing the one gate (Liger has no second gate and adds no
    parameter); so a pair of tokens is weighted by the gates between them in the scan order, whichever comes
    first. Prefix tokens lead every order: the forward half carries them to the image tokens and the backward
    half carries the image to them (both decayed along the scan), while in the window part they attend to and
    are attended by every token. The window is 2-D and bidirectional, not causal 1-D; no RoPE in it (ViTs have
    absolute positions); the official fp32 → bf16 casts are not copied (the output keeps the input dtype).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 radius: int = 5, window_mix: float = 0.5, gate_normalizer: float = GATE_LOGIT_NORMALIZER,
                 order: str = "raster", backend: str = "auto"):
        super().__init__(dim, num_heads, check_bool("qkv_bias", qkv_bias), check_bool("proj_bias", proj_bias))
        self.radius = check_int("radius", radius, min=1)
        self.window_mix = check_float("window_mix", window_mix, min=0.0, max=1.0)
        self.gate_normalizer = check_float("gate_normalizer", gate_normalizer, min=0.0, min_open=True)
        self.order = check_choice("order", order, ORDERS)
        self.backend = check_backend(backend)

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        q, k, v = self.project_qkv(x)
        fq, fk, g = liger_gates(q, k, self.gate_normalizer)

        def scan(fq, fk, v, g):
            return gated_scan(fq, fk, v, g, direction="bidirectional", scale=1.0, backend=self.backend)

        o = scan_in_orders(scan, (fq, fk, v.to(fq.dtype), g), hw, num_prefix_tokens, self.order)
        if self.window_mix == 0:
            return map_token_chunks(lambda o: self.proj(o.to(x.dtype).flatten(2)), o)

        def mixed(a: int, b: int, o_win: Tensor) -> Tensor:  # rows a:b of both parts, mixed and projected
            o_ab = self.window_mix * o_win.to(o.dtype) + (1 - self.window_mix) * o[:, a:b]
            return self.proj(o_ab.to(x.dtype).flatten(2))

        return window_attention(q, k, v, hw, radius=self.radius, num_prefix_tokens=num_prefix_tokens,
                                backend=self.backend, output=mixed)

    def attention_rows(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int
                       ) -> Tuple[Tensor, Tensor, Callable[[int, int], Tensor]]:
        """``(q, k, rows)`` for attention transfer: the mixed weights of query rows ``a:b``, ``[B, H, n, N]``
        (the linear part's rows are not normalised, as in the mixer; memory ``O(n · N · D)`` per call)."""
        q, k, _ = self.project_qkv(x)
        fq, fk, g = liger_gates(q, k, self.gate_normalizer)

        def rows(a: int, b: int) -> Tensor:
            out = gated_rows(fq, fk, g, hw, num_prefix_tokens, self.order, a, b)
            if self.window_mix == 0:
                return out
            mask = window_rows(hw, num_prefix_tokens, "disc", self.radius, a, b, q.device)
            s = torch.einsum("bnhd,bmhd->bhnm", q[:, a:b].to(fq.dtype), k.to(fq.dtype)) * q.shape[-1] ** -0.5
            win = s.masked_fill(~mask, float("-inf")).softmax(-1)
            return self.window_mix * win + (1 - self.window_mix) * out

        return q, k, rows

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, radius={self.radius}, window_mix={self.window_mix}, order={self.order!r}"


__all__ = ["GATE_LOGIT_NORMALIZER", "LigerAttention", "gated_rows", "liger_gates", "packed_gates"]
