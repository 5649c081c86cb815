"""Kimi Delta Attention (per-channel gated delta rule) as a bidirectional token mixer.

Paper: Kimi Team, "Kimi Linear: An Expressive, Efficient Attention Architecture", arXiv 2510.26692 (KDA).
Official code: ``fla-org/flash-linear-attention`` at ``bc3b101``, ``fla/layers/kda.py::KimiDeltaAttention``
(kernels ``fla/ops/kda``, gate ``fla/ops/kda/gate.py::naive_kda_gate``). The layer is causal (language); the
vision mixer runs both directions.

Per head (``Dk = head_dim``, ``Dv = expand_v·Dk``)::

    q, k, v = SiLU(conv(q_proj(x))), SiLU(conv(k_proj(x))), SiLU(conv(v_proj(x)))    depth-wise, kernel conv_size
    g       = −exp(A_log) · softplus(f_proj(x) + dt_bias)        per key channel (low-rank f_proj: dim → Dv → key_dim)
    β       = sigmoid(b_proj(x))   (×2 with allow_neg_eigval)
    S       ← (I − β k kᵀ) diag(e^g) S + β k vᵀ                  q, k L2-normalised, scale Dk^-1/2
    y       = o_proj(RMSNorm(o) · sigmoid(g_proj(x)))            o_norm: fla's FusedRMSNormGated, sigmoid gate

Bidirectional (the default): the forward and backward scans share the gates, the diagonal counted once
(:func:`linvision.kernels.gated_scan`, ``direction="bidirectional"``), and the short convolutions are made
non-causal with SANA's trick (causal kernel forward plus backward minus the centre tap). ``causal=True`` is the
official causal layer (forward scan, causal convolutions) and matches it. Parameter names and initialisation
are the official ones (nn.Linear defaults, ``A_log = log U(1, 16)``, ``dt_bias = softplus^-1(dt)`` with
``dt`` log-uniform in [0.001, 0.1], norm weight 1).

Prefix tokens lead the order (:mod:`.orders`). Deviations: bidirectional form and orders (none upstream); no
grouped value heads (``num_v_heads``), ``safe_gate`` / ``lower_bound`` gates, caches or variable-length packing;
states, gates, the norm and the output gate in fp32 (fp64 for fp64 inputs).
Computation: per scan order, the projections, short convolutions (each chunk of tokens reads its ``conv_size − 1``
halo tokens, :func:`.short_conv.short_conv_rows`), gates and β are built in chunks of tokens into one packed buffer
whose views feed the scan; the norm, output gate and ``o_proj`` are one chunked pass over the scan's output.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.backend import accumulation_dtype, check_backend
from ..kernels.gated_recurrence import gated_scan
from ..kernels.validation import check_bool, check_choice, check_float, check_int, check_optional
from .base import TokenMixer
from .gla import rms_norm_wide
from .orders import ORDERS, scan_in_orders
from .short_conv import conv_halo, short_conv, short_conv_rows
from .token_chunks import map_token_chunks, map_token_windows


class KimiDeltaAttention(TokenMixer):
    """KDA, bidirectional by default (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: Optional[int] = None,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        causal: bool = False,
        order: str = "raster",
        chunk_size: Optional[int] = None,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads)
        self.head_k_dim = dim // num_heads if head_dim is None else check_int("head_dim", head_dim, min=1)
        expand_v = check_float("expand_v", expand_v, min=0, min_open=True)
        self.head_v_dim = int(self.head_k_dim * expand_v)
        if self.head_v_dim != self.head_k_dim * expand_v or self.head_v_dim == 0:
            raise ValueError(f"expand_v={expand_v} must make head_dim·expand_v a positive int (head_dim={self.head_k_dim})")
        self.key_dim, self.value_dim = num_heads * self.head_k_dim, num_heads * self.head_v_dim
        self.use_short_conv = check_bool("use_short_conv", use_short_conv)
        conv_size = check_int("conv_size", conv_size, min=1)
        check_bool("conv_bias", conv_bias)
        self.allow_neg_eigval = check_bool("allow_neg_eigval", allow_neg_eigval)
        norm_eps = check_float("norm_eps", norm_eps, min=0, min_open=True)
        self.causal = check_bool("causal", causal)
        self.order = check_choice("order", order, ORDERS)
        self.chunk_size = check_optional(check_int, "chunk_size", chunk_size, min=1)
        self.backend = check_backend(backend)
        self.q_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.value_dim, bias=False)
        if use_short_conv:
            for name, width in (("q_conv1d", self.key_dim), ("k_conv1d", self.key_dim), ("v_conv1d", self.value_dim)):
                conv = short_conv(conv_size, width)
                if conv_bias:
                    conv.bias = nn.Parameter(torch.zeros(width))
                setattr(self, name, conv)
        self.f_proj = nn.Sequential(nn.Linear(dim, self.head_v_dim, bias=False),
                                    nn.Linear(self.head_v_dim, self.key_dim, bias=False))
        self.b_proj = nn.Linear(dim, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(1, 16)))
        dt = torch.exp(torch.rand(self.key_dim) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1 of dt ~ logU(0.001, 0.1)
        self.g_proj = nn.Sequential(nn.Linear(dim, self.head_v_dim, bias=False),
                                    nn.Linear(self.head_v_dim, self.value_dim, bias=True))
        self.o_norm = nn.RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, dim, bias=False)

    def _conv(self, window: Tensor, name: str, start: int, stop: int, num_tokens: int) -> Tensor:
        """SiLU(short convolution) along the order, causal or bidirectional, of tokens ``start:stop`` of ``num_tokens``
        from their halo window ``[B, hi − lo, ·]`` (:func:`.short_conv.conv_halo`); SiLU alone without convolutions
        (the window is then the tokens themselves)."""
        if not self.use_short_conv:
            return F.silu(window)
        conv = getattr(self, name)
        y = short_conv_rows(window, conv.weight, start, stop, num_tokens, self.causal)
        if conv.bias is not None:
            y = y + conv.bias.to(y.dtype)
        return F.silu(y)

    def features(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Tokens ``start:stop`` of ``x (B, N, C)`` in scan order → ``[B, stop − start, 3·key_dim + value_dim + H]``:
        ``q, k, v`` (short convolution and SiLU, reading the halo tokens around the range), the gate ``g`` and
        ``β`` packed, in the accumulation dtype."""
        H, N = self.num_heads, x.shape[1]
        acc = accumulation_dtype(x.dtype)
        K = self.q_conv1d.kernel_size[0] if self.use_short_conv else 1
        window = x[:, slice(*conv_halo(start, stop, N, K, self.causal))]
        q, k, v = (self._conv(proj(window).to(acc), name, start, stop, N)
                   for proj, name in ((self.q_proj, "q_conv1d"), (self.k_proj, "k_conv1d"), (self.v_proj, "v_conv1d")))
        x = x[:, start:stop]
        g = -self.A_log.to(acc).exp()[:, None] * F.softplus(
            (self.f_proj(x).to(acc) + self.dt_bias.to(acc)).unflatten(-1, (H, -1)))
        beta = torch.sigmoid(self.b_proj(x).to(acc))
        return torch.cat([q, k, v, g.flatten(2), beta], -1)

    def unpack(self, f: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Views of the packed features ``f [B, n, ·]``: ``q, k, g [B, n, H, Dk]``, ``v [B, n, H, Dv]``, ``β [B, n, H]``."""
        H = self.num_heads
        q, k, v, g, beta = f.split([self.key_dim, self.key_dim, self.value_dim, self.key_dim, H], -1)
        return tuple(t.unflatten(-1, (H, -1)) for t in (q, k, v, g)) + (beta,)

    def gate_output(self, o: Tensor, x: Tensor) -> Tensor:
        """Token-wise epilogue: ``o_proj(RMSNorm(o)·sigmoid(g_proj(x)))``, ``o [B, n, H, Dv]``, ``x (B, n, C)``."""
        acc = accumulation_dtype(x.dtype)
        o = rms_norm_wide(o, self.o_norm) * torch.sigmoid(self.g_proj(x).to(acc)).unflatten(-1, (self.num_heads, -1))
        return self.o_proj(o.flatten(2).to(x.dtype))

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        N = x.shape[1]
        row = 3 * self.key_dim + self.value_dim + self.num_heads

        def scan(x):  # x in scan order; its features in one packed buffer (gates, scan, norm, output gate: fp32)
            f = map_token_windows(lambda a, b: self.features(x, a, b), x, N, row)
            q, k, v, g, beta = self.unpack(f)
            return gated_scan(q, k, v, g, beta, delta=True, qk_l2norm=True, allow_neg_eigval=self.allow_neg_eigval,
                              direction="forward" if self.causal else "bidirectional", chunk_size=self.chunk_size,
                              backend=self.backend)

        o = scan(x) if self.causal else scan_in_orders(scan, (x,), hw, num_prefix_tokens, self.order)
        return map_token_chunks(self.gate_output, o, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, head_dim={self.head_k_dim}, causal={self.causal}, order={self.order!r}"
