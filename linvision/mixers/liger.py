"""Liger: gated linear attention whose gates come from the key projection (no new parameters), mixed with a
window of softmax attention.

Paper: "Liger: Linearizing Large Language Models to Gated Recurrent Structures" (Lan et al., ICML 2025,
arXiv 2503.01496). Official code: OpenSparseLLMs/Linearization ``liger/models/liger_gla/modeling_liger_gla.py``
(``LigerGatedLinearAttention``).
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.backend import resolve_backend
from ..kernels.linear_attn import linear_attention
from ..kernels.validation import check_bool, check_float, check_int
from ..kernels.window_attn import window_attention
from .base import QKVMixer
from .hedgehog import normalised_rows
from .window2d import window_rows

GATE_LOGIT_NORMALIZER = 16  # official: g = logsigmoid(pool(k)) / 16


def liger_features(q: Tensor, k: Tensor, normalizer: float) -> Tuple[Tensor, Tensor]:
    """``(φ(q), γ ⊙ φ(k))``: ``φ = softmax`` over the head dim, ``γ = exp(logsigmoid(k) / normalizer)`` per
    channel (the one-step GLA decay of the official gate); fp32 (fp64 for fp64), ``[B, N, H, D]``."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(acc), k.to(acc)
    gate = torch.exp(F.logsigmoid(k) / normalizer)
    return q.softmax(-1), k.softmax(-1) * gate


class LigerAttention(QKVMixer):
    """``o = window_mix · softmax-window(q, k, v) + (1 − window_mix) · gated linear attention``, bidirectional, 2-D.

    Linear part: ``o_i = Σ_j φ(q_i)·(γ_j ⊙ φ(k_j)) v_j / (Σ_j φ(q_i)·(γ_j ⊙ φ(k_j)) + eps)`` with
    ``φ = softmax`` over the head dim (official ``F.softmax(q, -1)``, ``F.softmax(k, -1)``, scale 1) and the
    gate ``γ_j = exp(logsigmoid(g_j) / 16)``, ``g = AdaptiveAvgPool1d(H·D)(k)``. With as many key heads as
    query heads (every ViT) that pooling maps ``C`` channels to ``C``: it is the identity, so ``g = k`` —
    the gate is the key projection itself and Liger adds no parameter. Window part: softmax attention in
    CLEAR's disc of ``radius`` on the image grid (:func:`linvision.kernels.window_attn.window_attention`,
    prefix tokens global), for the official 64-token causal sliding window; ``window_mix = 0.5`` is the
    official ``0.5 * y + 0.5 * o_``. ``window_mix = 0`` leaves gated linear attention alone.

    Deviations (the official recurrence ``S_t = diag(α_t) S_{t−1} + k_t v_tᵀ``, ``o_t = q_tᵀ S_t``,
    ``α_t = exp(g_t)``, has no bidirectional, non-recurrent form): here the state is one sum over all
    tokens, and each key is weighted by its own gate ``α_j`` once — the decay it gets in GLA when read
    by the next query — instead of the product of the gates between key and query. Without the decay an
    unnormalised sum grows with ``N``, so the linear part is normalised (``eps``), which GLA is not.
    No RoPE in the window (ViTs have absolute positions). Gated bidirectional scans would follow GLA's
    positional decay more closely; this mixer does not use them.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 radius: int = 5, window_mix: float = 0.5, gate_normalizer: float = GATE_LOGIT_NORMALIZER,
                 eps: float = 1e-6, backend: str = "auto"):
        super().__init__(dim, num_heads, check_bool("qkv_bias", qkv_bias), check_bool("proj_bias", proj_bias))
        self.radius = check_int("radius", radius, min=1)
        self.window_mix = check_float("window_mix", window_mix, min=0.0, max=1.0)
        self.gate_normalizer = check_float("gate_normalizer", gate_normalizer, min=0.0, min_open=True)
        self.eps = check_float("eps", eps, min=0.0)
        resolve_backend(backend)
        self.backend = backend

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        q, k, v = self.project_qkv(x)
        fq, fk = liger_features(q, k, self.gate_normalizer)
        o = linear_attention(fq, fk, v.to(fq.dtype), eps=self.eps, backend=self.backend)
        if self.window_mix > 0:
            o_win = window_attention(q, k, v, hw, radius=self.radius, num_prefix_tokens=num_prefix_tokens,
                                     backend=self.backend)
            o = self.window_mix * o_win.to(o.dtype) + (1 - self.window_mix) * o
        return self.proj(o.to(x.dtype).flatten(2))

    def attention_rows(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int
                       ) -> Tuple[Tensor, Tensor, Callable[[int, int], Tensor]]:
        """``(q, k, rows)`` for attention transfer: the mixed weights of query rows ``a:b``, ``[B, H, n, N]``."""
        q, k, _ = self.project_qkv(x)
        fq, fk = liger_features(q, k, self.gate_normalizer)

        def rows(a: int, b: int) -> Tensor:
            out = normalised_rows(fq[:, a:b], fk, self.eps)
            if self.window_mix == 0:
                return out
            mask = window_rows(hw, num_prefix_tokens, "disc", self.radius, a, b, q.device)
            s = torch.einsum("bnhd,bmhd->bhnm", q[:, a:b].to(fq.dtype), k.to(fq.dtype)) * q.shape[-1] ** -0.5
            win = s.masked_fill(~mask, float("-inf")).softmax(-1)
            return self.window_mix * win + (1 - self.window_mix) * out

        return q, k, rows

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, radius={self.radius}, window_mix={self.window_mix}, eps={self.eps}"


__all__ = ["GATE_LOGIT_NORMALIZER", "LigerAttention", "liger_features"]
