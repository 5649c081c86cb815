"""SANA's ReLU linear attention (the self-attention of every SANA DiT block), on the linvision kernel.

Paper: "SANA: Efficient High-Resolution Image Synthesis with Linear Diffusion Transformers", Xie et al.,
arXiv 2410.10629; QK-norm from "SANA 1.5" (arXiv 2501.18427) and "SANA-Sprint" (arXiv 2503.09641).
Official file: ``NVlabs/Sana: diffusion/model/nets/sana_blocks.py::LiteLA``
@2cfb4f7c63284111109cc0a09050522fb7be806a (``attn_matmul``: ReLU kernel, V padded with a row of ones,
``eps=1e-15``; ``qk_norm``: ``RMSNorm(in_dim, eps=norm_eps=1e-5)`` over all heads' channels, applied to
``q`` and ``k`` after the projection and before the head split and the ReLU). diffusers' port, whose
parameter names this mixer keeps: ``diffusers/models/attention_processor.py::SanaLinearAttnProcessor2_0``
with ``Attention(qk_norm="rms_norm_across_heads")`` (``SanaTransformerBlock.attn1``).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from ..kernels.backend import check_backend, resolve_backend
from ..kernels.chunks import stack_chunks, stack_chunks_into
from ..kernels.linear_attn.guard import (
    GUARD_EXPONENT,
    guarded_relu_state,
    magnitude_guard,
    power_of_two_guard,
    relu_guard,
)
from ..kernels.linear_attn.naive import chunk_tokens
from ..kernels.linear_attn.state import apply_state
from ..kernels.linear_attn.streamed import linear_attention_streamed
from ..kernels.validation import check_bool, check_float
from .base import TokenMixer
from .token_chunks import reusable_output, token_chunk_outputs

FP16_MAX = 65504.0


class RMSNorm(nn.Module):
    """``x (…, C)`` → ``x / sqrt(mean(x²) + eps) · weight``, computed in fp32, returned in ``x``'s dtype.

    diffusers' ``RMSNorm(C, eps)`` with ``elementwise_affine=True`` (parameter ``weight``, no bias).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = check_float("norm_eps", eps, min=0, min_open=True)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SanaAttention(TokenMixer):
    """SANA self-attention: ``y = to_out(LinAttn(ReLU(q), ReLU(k), v))``, ``x, y: (B, N, C)``.

    Per head (``H = num_heads`` heads of ``d = C/H`` channels, channel ``h·d + i`` is head ``h``)::

        q = norm_q(to_q(x)),  k = norm_k(to_k(x)),  v = to_v(x)        (norms only with qk_norm=True)
        o_i = Σ_j (φq_i·φk_j) v_j / (Σ_j φq_i·φk_j + eps),  φ = ReLU,  eps = 1e-15 on the sums
        y = to_out[1](to_out[0](concat_h o))                            (Linear, Dropout)

    The official ``attn_matmul`` and diffusers' processor compute the same ratio with one matmul on V
    padded by a row of ones; here :func:`linvision.kernels.linear_attn.linear_attention` computes it with
    an fp32 state ``Σ_j φk_j v_jᵀ`` [d, d] and normaliser ``Σ_j φk_j`` [d] (O(N·d²), no [d+1, N] copy).
    Every token (prefix tokens too) joins the sums; ``hw`` is only checked (SANA has no positional term).

    Overflow guard: since ``o_i`` does not change when ``φq`` or ``φk`` is multiplied by a positive number
    (up to eps) and is linear in ``v``, each of ``q``, ``k``, ``v`` is divided per (batch, head) by a power
    of two that brings its largest ReLU feature (``|v|`` for ``v``) below 2**16, and ``o`` is multiplied
    back. Powers of two are exact, and the divisor is 1 whenever the peak is below 2**16 (every ordinary input),
    so then the result is the unguarded one. Beyond that the fp32 sums stay finite at any bf16/fp16 input
    (diffusers' fp32 sums overflow once ``Σ_j |v_j|·φk_j`` passes 3.4e38, e.g. bf16 activations of 2**60 at
    64K tokens), and eps acts as ``eps·s_q·s_k`` in the original units. On the PyTorch path the keys and values
    are projected chunk by chunk of tokens into the state and never held whole: the key and value divisors grow
    as the chunks come and the sums so far are rescaled exactly
    (:func:`linvision.kernels.linear_attn.guard.guarded_relu_state`), so the result is that of the final divisors.

    Options: ``qkv_bias`` (False: SANA's ``attention_bias``), ``out_bias`` (True), ``qk_norm`` (False;
    SANA-1.5/Sprint: True), ``norm_eps`` (1e-5, the official ``norm_eps`` and diffusers' ``Attention`` eps),
    ``eps`` (1e-15), ``dropout`` (0.0), ``backend`` (kernel backend).

    Parameter names are those of diffusers' ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``,
    ``norm_q``, ``norm_k``), so ``mixer.load_state_dict(block.attn1.state_dict())`` loads a SANA block's
    self-attention as it is. As in both references, fp16 outputs are clipped to ±65504 after ``to_out``.

    Deviations: the kernel's sum order differs from the padded-V matmul (same values up to fp32 rounding);
    no ``encoder_hidden_states``, attention mask or RoPE (``LiteLA``'s optional ``image_rotary_emb``,
    unused by the text-to-image models); the overflow guard above (max-reductions of ``q`` and of each key
    chunk, one scaled copy of ``q`` per chunk); the QK RMSNorms compute in fp32 and return the input dtype
    (diffusers' ``RMSNorm`` returns its weight's dtype).
    """

    softmax_weights = "to_qkv"
    paper_inherit = "qkv+proj"  # its own attention's weights

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        out_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        eps: float = 1e-15,
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads)
        check_bool("qkv_bias", qkv_bias)
        check_bool("out_bias", out_bias)
        self.qk_norm = check_bool("qk_norm", qk_norm)
        norm_eps = check_float("norm_eps", norm_eps, min=0, min_open=True)
        self.eps = check_float("eps", eps, min=0)
        dropout = check_float("dropout", dropout, min=0, max=1, max_open=True)
        self.backend = check_backend(backend)
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=out_bias), nn.Dropout(dropout)])
        self.norm_q = RMSNorm(dim, norm_eps) if qk_norm else None
        self.norm_k = RMSNorm(dim, norm_eps) if qk_norm else None

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        q = self.to_q(x)
        q = self.split_heads(self.norm_q(q) if self.qk_norm else q)
        s_q = relu_guard(q)
        inv_q = (1.0 / s_q).to(q.dtype).unsqueeze(-1)
        if resolve_backend(self.backend, q) == "triton":
            return self._mix_whole(x, q, inv_q)
        # PyTorch: the keys and values projected chunk by chunk of tokens into the guarded state, never held whole;
        # then the queries, outputs and to_out chunk by chunk, the result into q's buffer when it has one (each
        # chunk's queries are read before its output is written)
        step = chunk_tokens(q)
        values = token_chunk_outputs(lambda t: self.split_heads(self.to_v(t)), x, step)
        state, _, s_v = guarded_relu_state(zip(token_chunk_outputs(self._keys, x, step), values))
        queries = q.split(step, 1)  # views; under autograd one concatenation in the backward, not a slice per chunk

        def chunk(a: int, b: int) -> Tensor:
            o = apply_state(queries[a // step] * inv_q, state, eps=self.eps, feature_map="relu")
            return self._output(o, s_v)

        buffer = reusable_output(q, x, 0)
        if buffer:
            return stack_chunks_into(chunk, q.shape[1], step, buffer["out"], 0)
        return stack_chunks(chunk, q.shape[1], step)

    def _keys(self, x: Tensor) -> Tensor:
        """Token-wise ``(B, n, C)`` → ``k [B, n, H, d]`` (normed with ``qk_norm``)."""
        k = self.to_k(x)
        return self.split_heads(self.norm_k(k) if self.qk_norm else k)

    def _output(self, o: Tensor, s_v: Tensor) -> Tensor:
        """Token-wise, ``o [B, n, H, d]`` → ``[B, n, C]``: the values' divisor back, ``to_out``, the fp16 clip."""
        y = self.to_out[1](self.to_out[0]((o * s_v.to(o.dtype).unsqueeze(-1)).flatten(2)))
        return y.clip(-FP16_MAX, FP16_MAX) if y.dtype == torch.float16 else y

    def _mix_whole(self, x: Tensor, q: Tensor, inv_q: Tensor) -> Tensor:
        """Triton: the keys and values whole, their divisors as per-token weights of the fused kernels."""
        k, v = self._keys(x), self.split_heads(self.to_v(x))
        s_k, s_v = relu_guard(k), magnitude_guard(v)
        return linear_attention_streamed(
            lambda a, b: (q[:, a:b] * inv_q, None), lambda a, b: (k[:, a:b], None), v, q.shape[1], k_weight=1.0 / s_k,
            v_weight=1.0 / s_v, feature_map="relu", eps=self.eps, output=lambda a, b, o: self._output(o, s_v),
            backend=self.backend, **reusable_output(v, x, 0),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qk_norm={self.qk_norm}, eps={self.eps}"


__all__ = ["GUARD_EXPONENT", "RMSNorm", "SanaAttention", "power_of_two_guard"]
