"""LinFusion's generalized linear attention: ELU+1 normalised linear attention with residual feature MLPs.

Paper: "LinFusion: 1 GPU, 1 Minute, 16K Image", Liu et al., arXiv 2409.02097.
Official file: ``Huage001/LinFusion: src/linfusion/attention.py::GeneralizedLinearAttention``
(with ``::get_none_linear_projection``) @62ef28985a18ee5691799c86c2e61f4019abf8d1; modules are built by
``src/linfusion/linfusion.py::LinFusion.__init__`` as ``GeneralizedLinearAttention(query_dim=dim_n,
out_dim=dim_n, dim_head=dim_n // heads, projection_mid_dim=...)`` on top of diffusers ``Attention``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..kernels.backend import check_backend
from ..kernels.linear_attn import linear_attention
from ..kernels.linear_attn.streamed import linear_attention_streamed
from ..kernels.validation import check_bool, check_float, check_int, check_optional
from .base import TokenMixer
from .inherit import softmax_attention_weights
from .token_chunks import token_rows


def feature_mlp(dim: int, mid_dim: Optional[int]) -> nn.Module:
    """The residual branch of LinFusion's feature map: ``(B, N, C)`` → ``(B, N, C)``.

    ``Sequential(Linear(C, m), LayerNorm(m), LeakyReLU(0.01), Linear(m, C))`` with ``m = C`` for
    ``mid_dim=None`` and ``m = mid_dim`` otherwise; ``mid_dim=-1`` gives ``nn.Identity()`` (no parameters).
    Indices 0..3 match the published checkpoints (``to_q_.0``, ``to_q_.1``, ``to_q_.3``).
    """
    if mid_dim == -1:
        return nn.Identity()
    m = dim if mid_dim is None else mid_dim
    return nn.Sequential(nn.Linear(dim, m), nn.LayerNorm(m), nn.LeakyReLU(0.01), nn.Linear(m, dim))


def linfusion_attention(q: Tensor, k: Tensor, v: Tensor, *, eps: float = 1e-4, backend: str = "auto") -> Tensor:
    """LinFusion's core after the projections: ELU+1 normalised linear attention, mean form, fp32 inside.

    ``q, k, v [B, N, H, d]`` (``q``, ``k`` from the residual feature inputs ``x + MLP(x)``) → ``(B, N, H·d)``
    in ``q``'s dtype. No spatial term: every token, prefix or text tokens included, is an ordinary token.
    :class:`LinFusionAttention` and the joint text+image processor
    (:class:`linvision.diffusers.joint.LinFusionProcessor`) both call it.
    """
    return linear_attention(q, k, v, mean=True, eps=eps, feature_map="elu+1", backend=backend).flatten(2)


class LinFusionAttention(TokenMixer):
    """LinFusion self-attention: ``y = to_out(LinAttn(φ(W_q(x + MLP_q(x))), φ(W_k(x + MLP_k(x))), W_v x))``.

    Shapes: ``x (B, N, C)`` → ``y (B, N, C)``; ``H = num_heads`` heads of ``d = C/H`` channels
    (diffusers' ``head_to_batch_dim`` split: channel ``h·d + i`` is head ``h``, channel ``i``).

    - ``q̂ = to_q(x + to_q_(x))``, ``k̂ = to_k(x + to_k_(x))``, ``v = to_v(x)``; ``to_q_``/``to_k_`` are
      :func:`feature_mlp` (``projection_mid_dim``: ``None`` → m = C (SD-1.5/2.1), ``C // 16`` for SDXL,
      ``-1`` → identity).
    - ``φ(u) = ELU(u) + 1``;  per head ``S = (φKᵀ N^-½)(V N^-½)`` [d, d],
      ``z = φQ · mean_N(φK) + eps`` [N, 1] (``eps = 1e-4`` on the mean), ``O = φQ S / z`` [N, d].
      The core runs in fp32 through :func:`linvision.kernels.linear_attn` (``mean=True``).
    - ``y = to_out[1](to_out[0](concat_h O))``: ``to_out[0]`` Linear(C, C) with bias, ``to_out[1]`` Dropout.

    No spatial or positional term: ``hw`` is only checked. Prefix tokens are ordinary tokens (they join
    the sums and get outputs like any other). Parameter names are the published ``Yuanshi/LinFusion-*``
    layout per module (``to_q.weight``, ``to_k.weight``, ``to_v.weight``, ``to_out.0.weight``,
    ``to_out.0.bias``, ``to_q_.{0,1,3}.{weight,bias}``, ``to_k_.…``), so a checkpoint's ``"{i}."`` sub-dict
    loads with ``load_state_dict``. Hence this mixer does not use the ``qkv``/``proj`` names.

    Init: PyTorch default for everything (the official default); :meth:`from_softmax` copies
    ``to_q/to_k/to_v/to_out`` from a teacher instead (the spec's teacher-copy option).

    Deviations from the official code, none of which change outputs beyond rounding:

    - ``LeakyReLU`` is not in-place (identical values; safe under autograd and ``torch.compile``).
    - φ and the core are evaluated in fp32 and cast back (the official path computes in the input
      dtype, e.g. fp16); projections and MLPs run in the input dtype as in the official code.
    - Self-attention only: no ``encoder_hidden_states``; ``attention_mask``, LoRA ``scale`` and
      ``cross_attention_kwargs`` are not arguments (the official forward accepts and ignores them).
    - ``projection_mid_dim=0`` raises ``ValueError`` (the official ``mid_dim or query_dim`` silently reads
      it as ``C``).

    Reproduced official behaviour worth knowing: with ``projection_mid_dim=-1`` the residual form gives
    ``q̂ = W_q(x + x) = W_q(2x)`` (and the same for k); no published checkpoint uses -1.
    """

    joint_attention = True
    softmax_weights = "to_qkv"  # the official init is PyTorch's default: paper_inherit stays "none"

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        projection_mid_dim: Optional[int] = None,
        eps: float = 1e-4,
        qkv_bias: bool = False,
        out_bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads)
        projection_mid_dim = check_optional(check_int, "projection_mid_dim", projection_mid_dim, min=-1)
        if projection_mid_dim == 0:
            raise ValueError("projection_mid_dim must be None, -1 or a positive int, got 0")
        self.projection_mid_dim = projection_mid_dim
        self.eps = check_float("eps", eps, min=0.0)
        qkv_bias = check_bool("qkv_bias", qkv_bias)
        out_bias = check_bool("out_bias", out_bias)
        dropout = check_float("dropout", dropout, min=0.0, max=1.0, max_open=True)
        self.backend = check_backend(backend)
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=out_bias), nn.Dropout(dropout)])
        self.to_q_ = feature_mlp(dim, self.projection_mid_dim)
        self.to_k_ = feature_mlp(dim, self.projection_mid_dim)

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        # q, k (and their feature MLPs), v and the output projection chunk by chunk of tokens: cache-sized temporaries
        q = token_rows(lambda t: self.split_heads(self.to_q(t + self.to_q_(t))), x)
        k = token_rows(lambda t: self.split_heads(self.to_k(t + self.to_k_(t))), x)
        v = token_rows(lambda t: self.split_heads(self.to_v(t)), x)
        N = x.shape[1]
        return linear_attention_streamed(
            lambda a, b: (q(a, b), None), lambda a, b: (k(a, b), None), v, N, num_keys=N, mean=True, eps=self.eps,
            feature_map="elu+1", backend=self.backend, output=lambda a, b, o: self.to_out[1](self.to_out[0](o.flatten(2))),
        )

    @classmethod
    def from_softmax(cls, attn: nn.Module, *, copy_weights: bool = True, **options) -> "LinFusionAttention":
        """A LinFusion mixer shaped like (and by default initialised from) a softmax self-attention.

        ``attn``: a diffusers ``Attention`` self-attention (an SD UNet's ``attn1``: ``to_q/to_k/to_v`` and
        ``to_out[0]`` copied as they are), or a ``qkv``/``proj`` attention (linvision ``SoftmaxAttention``,
        timm ``Attention``: ``qkv`` rows split into ``to_q``, ``to_k``, ``to_v``; ``proj`` → ``to_out[0]``).
        ``dim``, ``num_heads`` and the bias flags are read from it. ``copy_weights=False`` keeps PyTorch's
        default init (the official LinFusion init). The feature MLPs ``to_q_``/``to_k_`` are always new.
        Other ``options`` (``projection_mid_dim``, ``eps``, ``dropout``, ``backend``) go to the constructor.
        The result is on ``attn``'s device and dtype.
        """
        check_bool("copy_weights", copy_weights)
        src = softmax_attention_weights(attn)
        for key in ("dim", "num_heads", "qkv_bias", "out_bias"):
            if key in options:
                raise ValueError(f"{key} is read from the softmax attention; do not pass it")
        mixer = cls(
            dim=src.dim,
            num_heads=src.num_heads,
            qkv_bias=src.qkv_bias is not None,
            out_bias=src.proj_bias is not None,
            **options,
        )
        if copy_weights:
            with torch.no_grad():
                for i, lin in enumerate((mixer.to_q, mixer.to_k, mixer.to_v)):
                    rows = slice(i * src.dim, (i + 1) * src.dim)
                    lin.weight.copy_(src.qkv_weight[rows])
                    if src.qkv_bias is not None:
                        lin.bias.copy_(src.qkv_bias[rows])
                mixer.to_out[0].weight.copy_(src.proj_weight)
                if src.proj_bias is not None:
                    mixer.to_out[0].bias.copy_(src.proj_bias)
        return mixer.to(device=src.qkv_weight.device, dtype=src.qkv_weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, projection_mid_dim={self.projection_mid_dim}, eps={self.eps}"


__all__ = ["LinFusionAttention", "feature_mlp", "linfusion_attention"]
