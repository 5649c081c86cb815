"""Hedgehog: linear attention whose per-head feature maps are trained to mimic softmax attention.

Paper: "The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry" (Zhang et al.,
ICLR 2024, arXiv 2402.04347). Feature map as in HazyResearch/lolcats ``src/model/feature_map.py``
(``FeatureMapMLP`` + ``SoftmaxDim`` / ``Exp``) and fla ``fla/modules/feature_map.py::HedgehogFeatureMap``.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.linear_attn.streamed import linear_attention_streamed
from ..kernels.validation import check_bool, check_choice, check_float, check_int
from ..kernels.backend import accumulation_dtype, check_backend
from .base import QKVMixer
from .rotary import Rotation, rotary_linear_attention

FORMS = ("softmax", "joint", "exp")


class HedgehogFeatureMap(nn.Module):
    """Per-head learnable feature map ``x [B, N, H, D]`` → ``φ(x) [B, N, H, 2F]``, with ``z = x W_h + b_h``:

    - ``form="softmax"``: ``[softmax_F(z), softmax_F(−z)]`` clamped at ``eps`` (LoLCATs' ``SoftmaxDim``, the
      ``feature_map: softmax_dim`` of every LoLCATs config; ``eps = 1e-12`` as there);
    - ``form="joint"``: ``softmax_2F([2z, −2z])`` (fla's ``HedgehogFeatureMap``: one softmax over both
      halves, factor 2; no clamp);
    - ``form="exp"``: ``[exp(z − max z), exp(−z + min z)]`` clamped at ``eps`` (LoLCATs' ``Exp``: the
      paper's ``exp`` with the per-token shift that keeps it finite).

    ``W_h (D, F)`` starts as the identity (rectangular eye when ``F != D``), ``b_h`` at zero: fla's init and
    the paper's. Deviations: LoLCATs' configs use ``zero_init: false`` (Kaiming-uniform ``W``) and no bias;
    fla shares one ``nn.Linear(D, D)`` across heads, here every head has its own ``W_h, b_h`` (LoLCATs'
    ``untied_head_einsum``). The map is evaluated in fp32 (fp64 for fp64 input) and returned in that dtype.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: Optional[int] = None, form: str = "softmax",
                 bias: bool = True, eps: float = 1e-12):
        super().__init__()
        self.num_heads = check_int("num_heads", num_heads, min=1)
        self.head_dim = check_int("head_dim", head_dim, min=1)
        self.feature_dim = head_dim if feature_dim is None else check_int("feature_dim", feature_dim, min=1)
        self.form = check_choice("form", form, FORMS)
        self.eps = check_float("eps", eps, min=0.0)
        check_bool("bias", bias)
        eye = torch.eye(self.head_dim, self.feature_dim)
        self.weight = nn.Parameter(eye.expand(self.num_heads, -1, -1).clone())  # (H, D, F)
        self.bias = nn.Parameter(torch.zeros(self.num_heads, self.feature_dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        z = torch.einsum("bnhd,hdf->bnhf", x.to(acc), self.weight.to(acc))
        if self.bias is not None:
            z = z + self.bias.to(acc)
        if self.form == "joint":
            return torch.cat([2 * z, -2 * z], -1).softmax(-1)
        if self.form == "softmax":
            out = torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)
        else:
            out = torch.cat([torch.exp(z - z.amax(-1, keepdim=True)), torch.exp(z.amin(-1, keepdim=True) - z)], -1)
        return out.clamp(min=self.eps)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}, "
                f"form={self.form!r}, bias={self.bias is not None}, eps={self.eps}")


def normalised_rows(fq: Tensor, fk: Tensor, eps: float, rfq: Optional[Tensor] = None,
                    rfk: Optional[Tensor] = None) -> Tensor:
    """Linear attention's weights ``φ(q_i)·φ(k_j) / (Σ_j φ(q_i)·φ(k_j) + eps)``: ``[B, H, n, N]`` for query
    features ``fq [B, n, H, F]`` against all key features ``fk [B, N, H, F]`` (fp32; fp64 for fp64).
    ``rfq, rfk``: rotated features for the numerator (RoFormer's form with RoPE), the normaliser keeps
    ``fq, fk``."""
    acc = torch.float64 if fq.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bnhf,bmhf->bhnm", fq.to(acc), fk.to(acc))
    if rfq is None:
        return scores / (scores.sum(-1, keepdim=True) + eps)
    rotated = torch.einsum("bnhf,bmhf->bhnm", rfq.to(acc), rfk.to(acc))
    return rotated / (scores.sum(-1, keepdim=True) + eps)


class HedgehogAttention(QKVMixer):
    """Linear attention with Hedgehog feature maps on q and k (separate maps, as LoLCATs' ``tie_qk_kernels:
    false``): ``o_i = Σ_j φ_q(q_i)·φ_k(k_j) v_j / (Σ_j φ_q(q_i)·φ_k(k_j) + eps)`` over all tokens.

    Bidirectional: every query sees every token (prefix tokens included); the causal prefix sums of the
    paper become one state (the kernel :func:`linvision.kernels.linear_attn.linear_attention`, fp32).
    ``eps = 1e-12`` is LoLCATs' ``linear_attention`` eps. q/k/v/proj inherit from a softmax attention
    (``linvision.timm.linearize``); ``feature_map_q`` / ``feature_map_k`` are the new parameters that
    attention transfer trains (:mod:`linvision.distill.transfer`).

    A teacher's q/k norms (:meth:`carry_qk_norm`) act before the feature maps; a teacher's RoPE (``rope``)
    rotates ``φ_q(q), φ_k(k)`` per block of ``D`` in the numerator only (RoFormer's linear form,
    :func:`linvision.mixers.rotary.rotary_linear_attention`); ``2·feature_dim`` must then be a multiple of the head dim.
    """

    supports_rope = True
    supports_qk_norm = True

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 feature_dim: Optional[int] = None, form: str = "softmax", feature_bias: bool = True,
                 eps: float = 1e-12, backend: str = "auto"):
        super().__init__(dim, num_heads, check_bool("qkv_bias", qkv_bias), check_bool("proj_bias", proj_bias))
        self.eps = check_float("eps", eps, min=0.0)
        self.backend = check_backend(backend)
        check_bool("feature_bias", feature_bias)
        self.feature_map_q = HedgehogFeatureMap(num_heads, self.head_dim, feature_dim, form, feature_bias)
        self.feature_map_k = HedgehogFeatureMap(num_heads, self.head_dim, feature_dim, form, feature_bias)

    def features(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(q, k, v, φ_q(q), φ_k(k))`` of ``x (B, N, C)``, each ``[B, N, H, ·]``."""
        q, k, v = self.project_qkv(x)
        return q, k, v, self.feature_map_q(q), self.feature_map_k(k)

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int, rope: Optional[Rotation] = None) -> Tensor:
        if rope is not None:
            _, _, v, fq, fk = self.features(x)
            o = rotary_linear_attention(fq, fk, v.to(fq.dtype), rope, num_prefix_tokens, self.eps, self.backend)
            return self.proj(o.to(x.dtype).flatten(2))
        q, k, v = self.qkv_rows(x)
        acc, N = accumulation_dtype(x.dtype), x.shape[1]
        # projections and feature maps chunk by chunk of tokens, and the projection in token chunks: cache-sized
        # temporaries, no full-size q, k, v or features
        return linear_attention_streamed(
            lambda a, b: (self.feature_map_q(q(a, b)), None), lambda a, b: (self.feature_map_k(k(a, b)), None),
            lambda a, b: v(a, b).to(acc), N, num_keys=N, eps=self.eps, backend=self.backend,
            output=lambda a, b, o: self.proj(o.to(x.dtype).flatten(2)),
        )

    def attention_rows(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int, rope: Optional[Rotation] = None
                       ) -> Tuple[Tensor, Tensor, Callable[[int, int], Tensor]]:
        """For attention transfer: ``(q, k, rows)``, ``rows(a, b)`` this mixer's normalised weights of query
        rows ``a:b`` against all keys, ``[B, H, b − a, N]`` (see :mod:`linvision.distill.transfer`); with
        ``rope``, ``q, k`` are rotated (the teacher's) and the rows are RoFormer's."""
        q, k, _, fq, fk = self.features(x)
        if rope is None:
            return q, k, lambda a, b: normalised_rows(fq[:, a:b], fk, self.eps)
        T = num_prefix_tokens
        rfq, rfk = rope.apply(fq, T), rope.apply(fk, T)
        return (rope.apply(q, T), rope.apply(k, T),
                lambda a, b: normalised_rows(fq[:, a:b], fk, self.eps, rfq[:, a:b], rfk))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


__all__ = ["FORMS", "HedgehogAttention", "HedgehogFeatureMap", "normalised_rows"]
