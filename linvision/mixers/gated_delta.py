"""SANA's bidirectional gated delta net (BidirectionalGDN) as a token mixer over a 2-D token order.

Paper: SANA-Video (Junsong Chen et al., NVIDIA, arXiv 2509.24695) and the SANA-WM release; the gated delta rule
is Gated DeltaNet (Songlin Yang et al., ICLR 2025, arXiv 2412.06464). Official code: ``NVlabs/Sana`` at
``694f58c``, ``diffusion/model/nets/sana_gdn_blocks.py::BidirectionalGDN`` (forward/backward fusion of
``GDN``, recurrence ``torch_recurrent_sana_gdn``).

Per head (``D = head_dim``), every token one step of the scan::

    q, k, v  = qkv(x);  k ← k + conv_k(k) along the order (bidirectional: forward + backward − centre tap)
    q, k     = ReLU(q), L2norm(ReLU(k))               key_norm="l2" (default); "official": ReLU(k)·D^-1/2
    β        = sigmoid(beta_proj(x)),   α = exp(−exp(A_log)·softplus(gate_proj(x) + dt_bias))
    S        ← α S (I − β k kᵀ) + β v kᵀ          numerator state over v
    z        ← α z (I − β k kᵀ) + β kᵀ            denominator state, the delta rule towards the target 1
    o        = (S^f q + S^b q) / (z^f q + z^b q + eps)     forward inclusive, backward exclusive
    y        = proj(o · SiLU(output_gate(x)))

Both states are one :func:`linvision.kernels.gated_scan` over ``[v, 1]`` with ``delta=True`` and scale 1. The backward half reads the state of tokens ``t+1 …`` built with their own
gates and no decay at ``t`` (SANA's ``flip_and_shift``): a backward scan of the inputs shifted by one. The
token-wise inputs (projections, ``conv_k`` with its halo tokens, key norm, ``[v, 1]``, gates) are built in chunks
of tokens into one packed buffer of ``N + 1`` tokens, the last one zeros, so the shifted inputs are views of it;
the ratio, the output gate and ``proj`` are one chunked pass over the scan's output.

Initialisation ``_init_gdn_gates_for_linear_equiv`` (the block starts as plain ReLU linear attention): beta_proj
weight 0 / bias 5 (β ≈ 0.993), gate_proj weight 0 / bias 0, ``dt_bias = −5``, ``A_log = 0`` (α ≈ 0.993),
output_gate weight 0 / bias 1.278464542761074 (SiLU = 1), ``conv_k`` the identity (last tap 1); qkv and proj keep
nn.Linear's default init as the official timm ``Attention``. ``qkv_bias`` is SANA's ``use_bias`` (default False; the
project's option name, so softmax weights with biases load through the adapters). The ``recall_gate`` buffer (unused) is kept so that
official state dicts load strictly.

Deviations: ``key_norm="l2"`` by default. SANA's keys are ``ReLU(k)·(D·S)^-1/2`` without normalisation, so
``I − β k kᵀ`` has the eigenvalue ``1 − β‖k‖²``, below −1 as soon as ``‖k‖² > 2/β``; the state then grows
geometrically along the scan (at 64K tokens of unit-variance inputs ×4 the official form overflows even in fp32).
Unit keys keep every step contractive (Gated DeltaNet's rule); ``key_norm="official"`` reproduces SANA exactly
(the parity fixtures use it). SANA steps over video frames (all ``H·W`` tokens of a frame write at once, gates pooled per frame);
on an image every token is a step along ``order`` (raster, column or cross-scan), i.e. the official block on a
"video" of ``N`` frames of ``1×1``, which is how the parity fixture is made; the key scale
``D^-1/2·S^-1/2`` is then ``D^-1/2``. No RoPE, frame masks, q/k RMSNorm or ``k_conv_only=False`` options.
Prefix tokens lead the order (:mod:`.orders`).

DeltaProduct (``num_householder = n_h > 1``; Siems et al. 2025, "DeltaProduct: Improving State-Tracking in Linear
RNNs via Householder Products", arXiv 2502.10297; official layer ``fla-org/flash-linear-attention``,
``fla/layers/gated_deltaproduct.py``): every token writes ``n_h`` keys, values and betas, one delta step each
(``S ← (I − β_j k_j k_jᵀ) S + β_j k_j v_jᵀ`` for ``j = 1 … n_h``, so the transition is a product of ``n_h``
generalised Householder matrices), the gate decays once per token before the first step and the query reads after
the last. Parameter layout as fla's ``k_proj`` / ``v_proj`` / ``b_proj`` / ``k_conv1d``: the fused ``qkv``
projects to ``[q (h d), k (n h d), v (n h d)]`` (``dim·(1 + 2 n_h)`` outputs), ``beta_proj`` to ``(n h)``,
``conv_k`` filters all ``n_h·dim`` key channels; the names stay SANA's. ``n_h = 1`` is the block above, parameters
and outputs unchanged. Deviations (the paper is causal): the backward half visits the tokens in reverse and each
token's Householder steps in their order ``1 … n_h`` (as :func:`linvision.kernels.gated_scan` with
``num_householder``), shifted by one token as SANA's; the denominator ``z`` takes the same ``n_h`` steps towards
the target 1; the init is SANA's for every step (β ≈ 0.993 on each). fla's output RMSNorm, SiLU activations and
per-head value expansion are not taken over (this is SANA's block with fla's transition).
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
from .base import QKVMixer
from .orders import BASE_ORDERS, ORDERS, scan_in_orders
from .short_conv import conv_halo, short_conv, short_conv_rows
from .token_chunks import map_token_chunks, map_token_windows

OUTPUT_GATE_INIT_BIAS = 1.278464542761074  # SiLU(b) = 1
KEY_NORMS = ("l2", "official")


def l2_normalize(k: Tensor, eps: float = 1e-6) -> Tensor:
    """``k / sqrt(Σ k² + eps)`` over the head dim (fla's ``l2norm``, also SANA's ``l2norm`` helper)."""
    return k * torch.rsqrt(k.square().sum(-1, keepdim=True) + eps)


def delta_bidirectional(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, num_householder: int = 1, **scan
) -> Tensor:
    """SANA's fusion: forward gated-delta scan (inclusive) plus the backward scan of the next tokens.

    ``q [B, N, H, Dk]``; ``k, v, beta`` with ``num_householder`` rows per token and ``g [B, N + 1, H]`` over
    ``N + 1`` tokens, the last one zeros (``k [B, (N + 1)·n_h, H, Dk]``): the backward half reads them shifted by
    one token (SANA's ``flip_and_shift``, the zero token closing the order) as views, without shifted copies."""
    N, n = q.shape[1], num_householder
    fwd = gated_scan(q, k[:, : N * n], v[:, : N * n], g[:, :N], beta[:, : N * n], delta=True, direction="forward",
                     num_householder=n, **scan)
    # the backward half added into the forward half's output (in place without autograd): no output of its own
    return gated_scan(q, k[:, n:], v[:, n:], g[:, 1:], beta[:, n:], delta=True, direction="backward",
                      num_householder=n, add_to=fwd, **scan)


class BidirectionalGDN(QKVMixer):
    """SANA's BidirectionalGDN on a token order (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        use_output_gate: bool = True,
        conv_kernel_size: int = 4,
        eps: float = 1e-15,
        key_norm: str = "l2",
        num_householder: int = 1,
        order: str = "raster",
        chunk_size: Optional[int] = None,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, check_bool("qkv_bias", qkv_bias), check_bool("proj_bias", proj_bias))
        self.heads = num_heads
        self.use_output_gate = check_bool("use_output_gate", use_output_gate)
        conv_kernel_size = check_int("conv_kernel_size", conv_kernel_size, min=0)
        self.eps = check_float("eps", eps, min=0)
        self.key_norm = check_choice("key_norm", key_norm, KEY_NORMS)
        self.num_householder = n = check_int("num_householder", num_householder, min=1)
        if n > 1:  # fla's layout: [q (h d), k (n h d), v (n h d)]
            self.qkv = nn.Linear(dim, dim * (1 + 2 * n), bias=qkv_bias)
        self.order = check_choice("order", order, ORDERS)
        self.chunk_size = check_optional(check_int, "chunk_size", chunk_size, min=1)
        self.backend = check_backend(backend)
        self.beta_proj = nn.Linear(dim, num_heads * n, bias=True)  # (n h), fla's b_proj
        self.gate_proj = nn.Linear(dim, num_heads, bias=True)
        self.A_log = nn.Parameter(torch.zeros(num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(num_heads))
        self.register_buffer("recall_gate", torch.zeros(1))
        self.output_gate = nn.Linear(dim, dim, bias=True) if use_output_gate else None
        self.conv_k = short_conv(conv_kernel_size, dim * n) if conv_kernel_size > 0 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """SANA's ``_init_gdn_gates_for_linear_equiv`` (see the module docstring)."""
        with torch.no_grad():
            nn.init.zeros_(self.beta_proj.weight)
            nn.init.constant_(self.beta_proj.bias, 5.0)
            nn.init.zeros_(self.gate_proj.weight)
            nn.init.zeros_(self.gate_proj.bias)
            self.dt_bias.fill_(-5.0)
            self.A_log.fill_(math.log(1.0))
            self.recall_gate.zero_()
            if self.output_gate is not None:
                nn.init.zeros_(self.output_gate.weight)
                nn.init.constant_(self.output_gate.bias, OUTPUT_GATE_INIT_BIAS)
            if self.conv_k is not None:
                self.conv_k.weight.zero_()
                self.conv_k.weight[:, 0, -1] = 1.0

    def init_weights(self) -> None:
        """Called by linvision's models after their own init, so the block keeps the official one."""
        self.reset_parameters()

    def project_qkv_steps(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``q [B, N, H, D]`` and the ``n_h`` keys and values of every token, ``[B, N, n_h·H, D]`` (``(n h)``)."""
        if self.num_householder == 1:
            return self.project_qkv(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).split([C, C * self.num_householder, C * self.num_householder], -1)
        return (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))

    def gates(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``β [B, N, n_h·H]`` (sigmoid, ``(n h)``) and the log decay ``−exp(A_log)·softplus(gate_proj(x) + dt_bias)``, fp32
        (fp64 for fp64 ``x``)."""
        acc = accumulation_dtype(x.dtype)
        beta = torch.sigmoid(self.beta_proj(x).to(acc))
        log_decay = -self.A_log.to(acc).exp() * F.softplus(self.gate_proj(x).to(acc) + self.dt_bias.to(acc))
        return beta, log_decay

    def features(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Tokens ``start:stop`` of ``x (B, N, C)`` in scan order (``stop ≤ N + 1``) → ``[B, stop − start, W]``:
        ``ReLU(q)``, the normalised keys (``conv_k`` reading the halo tokens around the range), ``[v, 1]``, the log
        decay and ``β`` packed (:meth:`unpack`), in the accumulation dtype; token ``N`` is all zeros."""
        N = x.shape[1]
        end = min(stop, N)
        K = 1 if self.conv_k is None else self.conv_k.kernel_size[0]
        lo, hi = conv_halo(start, end, N, K, causal=False)
        q, k, v = (t.to(accumulation_dtype(x.dtype)) for t in self.project_qkv_steps(x[:, lo:hi]))
        rows = slice(start - lo, end - lo)
        q, v = q[:, rows], v[:, rows]
        if self.conv_k is None:
            k = k[:, rows]
        else:
            k = short_conv_rows(k.flatten(2), self.conv_k.weight, start, end, N, causal=False).unflatten(-1, (-1, self.head_dim))
        q, k = F.relu(q), F.relu(k)
        k = l2_normalize(k) if self.key_norm == "l2" else k * self.head_dim ** -0.5
        v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)
        beta, log_decay = self.gates(x[:, start:end])
        f = torch.cat([q.flatten(2), k.flatten(2), v1.flatten(2), log_decay, beta], -1)
        return F.pad(f, (0, 0, 0, stop - end))

    def unpack(self, f: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The packed features ``f [B, N + 1, W]`` of :meth:`features` → ``q [B, N, H, D]`` and, over the ``N + 1``
        tokens in the ``(t n)`` layout, ``k [B, (N + 1)·n_h, H, D]``, ``[v, 1] [B, (N + 1)·n_h, H, D + 1]``,
        ``log_decay [B, N + 1, H]``, ``β [B, (N + 1)·n_h, H]``: views for ``n_h = 1``."""
        B, T = f.shape[:2]
        H, D, n = self.num_heads, self.head_dim, self.num_householder
        q, k, v1, log_decay, beta = f.split([H * D, n * H * D, n * H * (D + 1), H, n * H], -1)
        k, v1, beta = (t.reshape(B, T * n, H, d) for t, d in ((k, D), (v1, D + 1), (beta, 1)))
        return q[:, :-1].unflatten(-1, (H, D)), k, v1, log_decay, beta[..., 0]

    def scan(self, x: Tensor) -> Tensor:
        """Both halves on ``x (B, N, C)`` in scan order → ``[S q, z q]`` ``[B, N, H, D + 1]`` (its features one packed
        buffer, built in token chunks)."""
        N, C = x.shape[1:]
        row = C + self.num_householder * (C + self.num_heads * (self.head_dim + 2)) + self.num_heads
        f = map_token_windows(lambda a, b: self.features(x, a, b), x, N + 1, row)
        return delta_bidirectional(*self.unpack(f), self.num_householder, scale=1.0, chunk_size=self.chunk_size,
                                   backend=self.backend)

    def ratio(self, out: Tensor) -> Tensor:
        """``[S q, z q] [B, n, H, D + 1]`` → ``S q / (z q + eps)`` ``[B, n, H, D]``."""
        return out[..., :-1] / (out[..., -1:] + self.eps)

    def gate_output(self, o: Tensor, x: Tensor) -> Tensor:
        """Token-wise epilogue: ``proj(o · SiLU(output_gate(x)))``, ``o [B, n, H, D]``, ``x (B, n, C)``."""
        o = o.flatten(2)
        if self.output_gate is not None:
            o = o * F.silu(self.output_gate(x).to(o.dtype))
        return self.proj(o.to(x.dtype))

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        if len(BASE_ORDERS[self.order]) == 1:  # the ratio is token-wise: taken in the epilogue, no buffer of its own
            out = scan_in_orders(self.scan, (x,), hw, num_prefix_tokens, self.order)
            return map_token_chunks(lambda out, x: self.gate_output(self.ratio(out), x), out, x)
        o = scan_in_orders(lambda x: map_token_chunks(self.ratio, self.scan(x)), (x,), hw, num_prefix_tokens, self.order)
        return map_token_chunks(self.gate_output, o, x)

    def extra_repr(self) -> str:
        steps = f", num_householder={self.num_householder}" if self.num_householder > 1 else ""
        return f"{super().extra_repr()}, order={self.order!r}{steps}, conv_kernel_size={0 if self.conv_k is None else self.conv_k.kernel_size[0]}"
