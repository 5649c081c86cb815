"""TransNormer's NormAttention: linear attention without a denominator, normalised after the product.

Paper: Qin et al., "The Devil in Linear Transformer" (EMNLP 2022, arXiv 2210.10340). Official code read at
``OpenNLPLab/fairseq-evo @38fa81f233c4e5b4376fb52d86eaa1a80d42bf6a``:
``fairseq/modules/x_attention/norm_linear_attention.py::NormLinearAttention`` (the non-causal branch), its
norms (:mod:`linvision.mixers.transnormer_norms`) and the paper's model configs
``fairseq/models/roberta_x_attention/norm_attention.py::roberta_transnormer_t1/t2`` (and the LM ones in
``lm_x_attention/norm_transformer_lm.py::transnormer_t1/t2``): ``linear_act_fun`` "elu" (T1) or "1+elu" (T2),
``norm_type="simplermsnorm"``, ``has_out=True``, ``attention_use_layer_norm=True``.
"""
from __future__ import annotations

import math
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.backend import accumulation_dtype, check_backend
from ..kernels.linear_attn.streamed import linear_attention_streamed
from ..kernels.validation import check_bool, check_choice
from .base import TokenMixer
from .token_chunks import token_rows
from .transnormer_norms import NORM_TYPES, build_norm

# The official ``get_activation_fn`` names this mixer accepts → (kernel-fused map, map applied before the kernel).
ACT_FUNS = {"1+elu": ("elu+1", None), "relu": ("relu", None), "elu": (None, F.elu)}


class NormAttention(TokenMixer):
    """``y = out_proj(Norm(φ(Q)(φ(K)ᵀV)))``: bidirectional linear attention with no ``1/(φ(q)·Σφ(k))`` term.

    Shapes: ``x (B, N, C)`` → ``y (B, N, C)``, ``H = num_heads`` heads of ``D = C/H`` channels; every token
    (prefix tokens included) joins the sums. Per head, ``O = φ(Q) (φ(K)ᵀ V)`` in O(N·D²) through
    :func:`linvision.kernels.linear_attn.linear_attention` (``normalize="none"``, fp32 state); the heads are
    concatenated and ``Norm`` acts on all ``C`` channels at once (official ``layer_norm``), then ``out_proj``.
    No scaling of Q (the paper's point: the scaling is what makes the gradients unbounded).

    Options (official names):

    - ``act_fun``: φ, ``"1+elu"`` (default; TransNormer T2), ``"elu"`` (T1: plain
      ELU, which can be negative), ``"relu"``.
    - ``norm_type``: ``"simplermsnorm"`` (default, T1 and T2), ``"rmsnorm"``, ``"gatedrmsnorm"``,
      ``"layernorm"`` (the module's own default, overridden by every TransNormer config).
    - ``bias``: biases of ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (official True).
    - ``backend``: the kernel's backend.

    Numerics: the sums are unbounded (they grow with N), so the kernel evaluates ``O/N`` (its ``mean``
    convention, independent of N) and the norm receives ``N·(O/N)`` in fp32; the result equals the official
    ``Norm(O)`` up to fp32 rounding. ``O/N = φ(Q)·mean(φ(K)ᵀV)`` still grows with the cube of the input
    scale (past 65504 for fp16 inputs of scale 100), so fp16 inputs run the kernel in fp32 (bf16 has fp32's
    range and keeps its dtype); fp16/bf16 inputs stay finite at 64K tokens.

    Parameters as the official module (``q_proj``, ``k_proj``, ``v_proj``, ``layer_norm``, ``out_proj``), so
    its state dict loads with ``strict=True``; init as its ``reset_parameters`` (Xavier-uniform, gain 2^-½ on
    q/k/v; ``out_proj`` Xavier-uniform with zero bias) in its creation order: under the same seed the
    initial weights equal the official module's.

    Deviations: the official module takes ``(L, B, C)`` sequences and no grid; ``hw`` is accepted and unused.
    Not built: URPE (a 1-D relative position encoding, on in the paper's T1/T2 models; the ViT here has
    absolute positions instead), the ``weight_type`` re-weightings and the Toeplitz branch (off in T1/T2),
    dropout (``use_dropout``, off by default), causal masking.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        act_fun: str = "1+elu",
        norm_type: str = "simplermsnorm",
        bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads)
        self.act_fun = check_choice("act_fun", act_fun, tuple(ACT_FUNS))
        self.norm_type = check_choice("norm_type", norm_type, NORM_TYPES)
        self.backend = check_backend(backend)
        bias = check_bool("bias", bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)  # the official creation order
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.layer_norm = build_norm(norm_type, dim)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official ``reset_parameters`` (q/k/v biases keep PyTorch's default)."""
        for proj in (self.k_proj, self.q_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        if self.out_proj.bias is not None:
            nn.init.constant_(self.out_proj.bias, 0.0)

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        fused, pre = ACT_FUNS[self.act_fun]
        # O/N is cubic in the input scale (no denominator): past fp16's range at inputs of scale 100, so
        # fp16 runs the kernel in fp32. bf16 shares fp32's exponent range and stays as it is.
        work = torch.float32 if x.dtype == torch.float16 else x.dtype
        N = x.shape[1]

        def projected(proj: nn.Linear, act=None) -> Callable[[int, int], Tensor]:
            def project(t: Tensor) -> Tensor:
                t = self.split_heads(proj(t)).to(work)
                return t if act is None else act(t)
            return token_rows(project, x)

        q, k, v = projected(self.q_proj, pre), projected(self.k_proj, pre), projected(self.v_proj)

        def output(a: int, b: int, o: Tensor) -> Tensor:  # Norm(N · O/N) and out_proj, token-wise
            total = o.flatten(2).to(accumulation_dtype(x.dtype)) * N
            return self.out_proj(self.layer_norm(total).to(x.dtype))

        # projections, norm and out_proj per chunk of tokens (linear_attention_streamed): cache-sized temporaries
        return linear_attention_streamed(
            lambda a, b: (q(a, b), None), lambda a, b: (k(a, b), None), v, N, num_keys=N, normalize="none",
            mean=True, feature_map=fused, output=output, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act_fun={self.act_fun!r}, norm_type={self.norm_type!r}"


__all__ = ["ACT_FUNS", "NormAttention"]
