"""ViG's bidirectional gated linear attention block as a token mixer.

Paper: Bencheng Liao et al., "ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention",
AAAI 2025 (arXiv 2405.18425). Official code: ``hustvl/ViG`` at ``dfb9d32``,
``classification/models/vig.py::GatedLinearAttention`` (the recurrence is fla's GLA, ``fused_chunk_gla`` /
``bid_fused_recurrent_gla``).

The block (per head; ``d_k = expand_k·dim/H``, ``d_v = expand_v·dim/H``)::

    xs        = SiLU(DWConv3×3(x))                      in_proj: the 2-D locality branch on the image grid
    q, k, v   = qkv_proj(xs)                            no bias
    g_f, g_b  = logsigmoid(gk_proj(xs)) / 16            low-rank (dim → 16 → 2·key_dim), one gate per direction
    o         = (GLA_fwd(q, k, v; g_f) + GLA_bwd(q, k, v; g_b)) / 2    both inclusive, scale d_k^-1/2
    g         = sigmoid(g_proj(xs))
    y         = o_proj(act(RMSNorm_g(o) · g + RMSNorm_l(xs) · (1 − g)))   ViG's 2-D locality gating

``act`` is SiLU with ``use_out_act`` (ViG-T), else the identity; ViG-S/B also set ``use_act_in_conv=False``.
``GLA_bwd`` is the same recurrence along the reversed order with its own gate. Both halves count the diagonal
(``o = (bidirectional + diag)/2`` with :func:`linvision.kernels.gated_scan`). Parameter names and
initialisation are the official ones (``reset_parameters``: Xavier-uniform with gain ``2^-2.5`` on every weight,
biases zero as ViG's model-level init leaves them).

Prefix tokens lead the scan (:mod:`.orders`); they skip the depth-wise convolution, so their local branch is the
input itself (ViG's rule for its class token). Deviations: ``order`` adds column and cross-scan orders (ViG
scans raster order only); ``expand_v`` must be 1 (the official local branch reshapes ``dim`` channels into
heads of ``d_v``, which needs it); no RoPE or ``use_dirpe`` options (off in every ViG config); the scan's output,
the norms and the gating run in fp32 whatever the input dtype (fp64 for fp64).
Computation: the token-wise work runs in chunks of tokens (:mod:`.token_chunks`), so no temporary is sized by
the sequence: the local branch (the depth-wise convolution read channels-last around each chunk's grid rows),
``q, k, v`` and the gates go into one packed buffer whose views feed the scan, and the diagonal, norms, gating and
``o_proj`` are one pass over the scan's output.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.backend import accumulation_dtype, check_backend
from ..kernels.gated_recurrence import gated_scan
from ..kernels.validation import check_bool, check_choice, check_float, check_int, check_optional
from .base import TokenMixer
from .orders import ORDERS, scan_in_orders
from .token_chunks import map_token_chunks, map_token_windows
from .token_conv import depthwise_conv_tokens


def rms_norm_wide(x: Tensor, norm: nn.RMSNorm) -> Tensor:
    """``norm(x)`` computed and returned in fp32 (fla's RMSNorm upcasts too), in fp64 for fp64 ``x``."""
    acc = accumulation_dtype(x.dtype)
    return F.rms_norm(x.to(acc), norm.normalized_shape, norm.weight.to(acc), norm.eps)


class ViGGatedLinearAttention(TokenMixer):
    """ViG's bidirectional GLA block (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        clamp_min: Optional[float] = None,
        layernorm_eps: float = 1e-5,
        use_act_in_conv: bool = True,
        use_bias_in_dwconv: bool = False,
        use_out_act: bool = False,
        order: str = "raster",
        chunk_size: Optional[int] = None,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads)
        expand_k = check_float("expand_k", expand_k, min=0, min_open=True)
        expand_v = check_float("expand_v", expand_v, min=1, max=1)
        self.key_dim, self.value_dim = int(dim * expand_k), int(dim * expand_v)
        if self.key_dim % num_heads or self.key_dim == 0:
            raise ValueError(f"key dim {self.key_dim} (dim·expand_k) must be a positive multiple of num_heads={num_heads}")
        gate_low_rank_dim = check_int("gate_low_rank_dim", gate_low_rank_dim, min=1)
        self.gate_logit_normalizer = check_float("gate_logit_normalizer", gate_logit_normalizer, min=0, min_open=True)
        self.clamp_min = check_optional(check_float, "clamp_min", clamp_min, max=0)
        layernorm_eps = check_float("layernorm_eps", layernorm_eps, min=0, min_open=True)
        check_bool("use_act_in_conv", use_act_in_conv)
        check_bool("use_bias_in_dwconv", use_bias_in_dwconv)
        self.use_out_act = check_bool("use_out_act", use_out_act)
        self.order = check_choice("order", order, ORDERS)
        self.chunk_size = check_optional(check_int, "chunk_size", chunk_size, min=1)
        self.backend = check_backend(backend)
        self.head_qk_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.in_proj = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=use_bias_in_dwconv),
            nn.SiLU() if use_act_in_conv else nn.Identity(),
        )
        self.qkv_proj = nn.Linear(dim, 2 * self.key_dim + self.value_dim, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(dim, gate_low_rank_dim, bias=False), nn.Linear(gate_low_rank_dim, 2 * self.key_dim, bias=True)
        )
        self.o_proj = nn.Linear(self.value_dim, dim, bias=False)
        self.g_norm = nn.RMSNorm(self.head_v_dim, eps=layernorm_eps)
        self.l_norm = nn.RMSNorm(self.head_v_dim, eps=layernorm_eps)
        self.g_proj = nn.Linear(dim, self.value_dim, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ViG's ``reset_parameters`` (Xavier gain 2^-2.5) after its model-level init (biases zero)."""
        gain = 2 ** -2.5
        for w in (self.qkv_proj.weight, self.in_proj[0].weight, self.g_proj.weight, self.o_proj.weight,
                  self.gk_proj[0].weight, self.gk_proj[1].weight):
            nn.init.xavier_uniform_(w, gain=gain)
        for b in (self.g_proj.bias, self.gk_proj[1].bias, self.in_proj[0].bias):
            if b is not None:
                nn.init.zeros_(b)
        nn.init.ones_(self.g_norm.weight)
        nn.init.ones_(self.l_norm.weight)

    def init_weights(self) -> None:
        """Called by linvision's models after their own init, so the block keeps the official one."""
        self.reset_parameters()

    def local_branch(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int, start: int = 0,
                     stop: Optional[int] = None) -> Tensor:
        """``in_proj`` on the image grid for tokens ``start:stop`` of ``x (B, N, C)``; prefix tokens pass through
        unchanged. ``(B, stop − start, C)``: the depth-wise convolution reads the grid rows around the range in place
        (:func:`.token_conv.depthwise_conv_tokens`, channels-last)."""
        P = num_prefix_tokens
        stop = x.shape[1] if stop is None else stop
        conv, act = self.in_proj
        local = act(depthwise_conv_tokens(x, hw, P, conv.weight, conv.bias, start, stop))
        if start >= P:
            return local
        return torch.cat([x[:, start : min(stop, P)], local[:, P - start :]], 1)

    def features(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int, start: int, stop: int) -> Tensor:
        """Tokens ``start:stop`` of ``x (B, N, C)`` → ``[B, stop − start, C + 2·key_dim + value_dim + 2·key_dim]``:
        ``xs, q, k, v, g_f, g_b`` packed, in the accumulation dtype (``xs`` cast back losslessly where used)."""
        acc = accumulation_dtype(x.dtype)
        xs = self.local_branch(x, hw, num_prefix_tokens, start, stop)
        gk = F.logsigmoid(self.gk_proj(xs).to(acc)) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            gk = gk.clamp_min(self.clamp_min)
        return torch.cat([xs.to(acc), self.qkv_proj(xs).to(acc), gk], -1)

    def gate_output(self, both: Tensor, f: Tensor, dtype: torch.dtype) -> Tensor:
        """Token-wise epilogue: ``both [B, n, H, d_v]`` (the two scans) and the packed features ``f`` of the same
        tokens → ``o_proj(act(RMSNorm_g((both + diag)/2)·g + RMSNorm_l(xs)·(1 − g)))`` ``[B, n, C]`` in ``dtype``."""
        H = self.num_heads
        xs, q, k, v, _ = self.unpack(f)
        diag = (q * k).sum(-1, keepdim=True) * v * self.head_qk_dim ** -0.5
        o = rms_norm_wide((both + diag) / 2, self.g_norm)
        xs = xs.to(dtype)
        local = rms_norm_wide(xs.unflatten(-1, (H, -1)), self.l_norm)
        g = torch.sigmoid(self.g_proj(xs).to(accumulation_dtype(dtype))).unflatten(-1, (H, -1))
        o = (o * g + local * (1 - g)).flatten(2)
        if self.use_out_act:
            o = F.silu(o)
        return self.o_proj(o.to(dtype))

    def unpack(self, f: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Views of the packed features ``f [B, n, ·]``: ``xs [B, n, C]``, ``q, k [B, n, H, d_k]``,
        ``v [B, n, H, d_v]`` and the gates ``g [B, n, 2, H, d_k]`` (forward, backward)."""
        H = self.num_heads
        xs, q, k, v, g = f.split([self.dim, self.key_dim, self.key_dim, self.value_dim, 2 * self.key_dim], -1)
        return xs, q.unflatten(-1, (H, -1)), k.unflatten(-1, (H, -1)), v.unflatten(-1, (H, -1)), g.unflatten(-1, (2, H, -1))

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        N, C = x.shape[1:]
        # one packed buffer of the token-wise features; scan output and epilogue in fp32 (fp64 for fp64)
        row = 2 * C + 4 * self.key_dim
        f = map_token_windows(lambda a, b: self.features(x, hw, num_prefix_tokens, a, b), x, N, row)
        _, q, k, v, g = self.unpack(f)

        def scan(q, k, v, g_f, g_b):
            return gated_scan(q, k, v, g_f, direction="bidirectional", g_backward=g_b, chunk_size=self.chunk_size,
                              backend=self.backend)

        both = scan_in_orders(scan, (q, k, v, g[:, :, 0], g[:, :, 1]), hw, num_prefix_tokens, self.order)
        return map_token_chunks(lambda both, f: self.gate_output(both, f, x.dtype), both, f)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, key_dim={self.key_dim}, order={self.order!r}"
