"""LION: bidirectional linear attention with a full mask ``M = L_f + L_b − I`` as a token mixer.

Paper: Arshia Afzal et al., "Linear Attention for Efficient Bidirectional Sequence Modeling" (LION),
arXiv 2502.16249. Official code: ``LIONS-EPFL/LION`` at ``32a0136``,
``img_classification/lion/models_lion.py::Lion_Attention`` (``format="Attention"``, the form its models train).

Per head, with ``s = head_dim^-1/2``::

    q, k, v = φ(qkv(x))                 φ = ELU+1 (Lit) or (SiLU + 0.5) / ‖·‖₂ (Decay, Selective); v as is
    A       = s · (q kᵀ) ⊙ M
    y       = proj( (A v) / (A 1 + 1e-6) )

Masks (``mask_type``): ``"Lit"``: ``M = 1``; ``"Decay"``: ``M_ij = σ(a_i)^|i−j|`` with one learned
``a_i [H]``; ``"Selective"``: token gates ``a_t = 1 − σ(a_i(x_t))`` (``a_i`` a Linear, fp32) with ``a_0 = 1``,
``M_ij = Π_{t=j}^{i−1} a_t`` below the diagonal and ``Π_{t=i+1}^{j} a_t`` above it (as the official
``Causal_Mask_Selective`` builds them: the forward half decays by the gate of the earlier token of each
step, the backward half by the later one). The mask is never formed: numerator and denominator are one
bidirectional :func:`linvision.kernels.gated_scan` over ``[v, 1]`` with the diagonal counted once, linear in N.

Prefix tokens lead the sequence (:mod:`.orders`), so a single class token sits at position 0 as in LION's ViT
(where ``a_0 = 1``). Deviations: the LION-S "S" curve order is not implemented (``order`` offers raster,
column and cross-scan instead); ``qkv_bias`` defaults to True, as every LION model sets it (the module's own
default is False); no dropout.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.backend import accumulation_dtype, check_backend
from ..kernels.gated_recurrence import gated_scan
from ..kernels.validation import check_bool, check_choice, check_float, check_int, check_optional
from .base import QKVMixer
from .token_chunks import map_token_chunks
from .orders import ORDERS, scan_in_orders

MASK_TYPES = ("Lit", "Decay", "Selective")
LION_EPS = 1e-6  # official: attn / (attn.sum(-1) + 1e-6)


def silu_shifted(x: Tensor) -> Tensor:
    """LION's feature map for Decay / Selective: ``(SiLU(x) + 0.5) / ‖SiLU(x) + 0.5‖₂`` over the head dim."""
    r = F.silu(x) + 0.5
    return r / torch.linalg.vector_norm(r, dim=-1, keepdim=True)


def shift_gates(log_a: Tensor) -> Tuple[Tensor, Tensor]:
    """Selective gates ``log a [B, N, H]`` (``a_0`` already 1) → the scan's forward gates ``log a_{t−1}`` and
    backward gates ``log a_{t+1}`` (zero, i.e. no decay, past either end)."""
    zero = log_a.new_zeros(log_a[:, :1].shape)
    return torch.cat([zero, log_a[:, :-1]], 1), torch.cat([log_a[:, 1:], zero], 1)


class LionAttention(QKVMixer):
    """LION's ``Lion_Attention`` (Lit / Decay / Selective masks); see the module docstring."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        mask_type: str = "Selective",
        qk_scale: Optional[float] = None,
        eps: float = LION_EPS,
        order: str = "raster",
        chunk_size: Optional[int] = None,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, check_bool("qkv_bias", qkv_bias), check_bool("proj_bias", proj_bias))
        self.mask_type = check_choice("mask_type", mask_type, MASK_TYPES)
        self.scale = self.head_dim ** -0.5 if qk_scale is None else check_float("qk_scale", qk_scale, min=0, min_open=True)
        self.eps = check_float("eps", eps, min=0)
        self.order = check_choice("order", order, ORDERS)
        self.chunk_size = check_optional(check_int, "chunk_size", chunk_size, min=1)
        self.backend = check_backend(backend)
        if mask_type == "Decay":
            self.a_i = nn.Parameter(torch.randn(num_heads))
        elif mask_type == "Selective":
            self.a_i = nn.Linear(dim, num_heads)

    def features(self, x: Tensor) -> Tensor:
        """Token-wise ``(B, n, C)`` → ``[B, n, H, 3D + 1 (+ 1)]``: ``φ(q), φ(k), v, 1`` and, for the Selective mask,
        the log gate ``log(1 − σ(a_i(x)))``; fp32 as the official (fp64 for fp64)."""
        acc = accumulation_dtype(x.dtype)
        q, k, v = (t.to(acc) for t in self.project_qkv(x))
        phi = (lambda t: F.elu(t) + 1) if self.mask_type == "Lit" else silu_shifted
        parts = [phi(q), phi(k), v, v.new_ones(*v.shape[:-1], 1)]
        if self.mask_type == "Selective":
            parts.append(F.logsigmoid(-self.a_i(x).to(acc))[..., None])
        return torch.cat(parts, -1)

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        B, N, C = x.shape
        D = self.head_dim
        f = map_token_chunks(self.features, x)  # one [B, N, H, 3D + 1 (+ 1)] buffer, cache-sized temporaries
        q, k, v1 = f[..., :D], f[..., D : 2 * D], f[..., 2 * D : 3 * D + 1]
        if self.mask_type == "Selective":
            log_a = (f[..., -1],)
        elif self.mask_type == "Decay":
            log_a = (F.logsigmoid(self.a_i.to(f.dtype)).expand(B, N, -1),)
        else:
            log_a = ()

        def scan(q, k, v1, *log_a):
            g = gb = None
            if self.mask_type == "Selective":
                g, gb = shift_gates(torch.cat([log_a[0].new_zeros(B, 1, self.num_heads), log_a[0][:, 1:]], 1))
            elif self.mask_type == "Decay":
                g = gb = log_a[0]
            return gated_scan(q, k, v1, g, direction="bidirectional", g_backward=gb, scale=self.scale,
                              chunk_size=self.chunk_size, backend=self.backend)

        o = scan_in_orders(scan, (q, k, v1) + log_a, hw, num_prefix_tokens, self.order)
        ratio = lambda o: self.proj((o[..., :-1] / (o[..., -1:] + self.eps)).to(x.dtype).flatten(2))  # noqa: E731
        return map_token_chunks(ratio, o)  # cache-sized temporaries

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_type={self.mask_type!r}, order={self.order!r}"
