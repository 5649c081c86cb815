"""Plain normalised linear attention (Katharopoulos et al., 2020) on the linvision kernel."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from ..kernels.backend import accumulation_dtype, check_backend
from ..kernels.linear_attn.streamed import linear_attention_streamed
from ..kernels.linear_attn.feature_maps import apply_feature_map
from ..kernels.validation import check_choice, check_float
from .base import QKVMixer
from .rotary import Rotation, rotary_linear_attention

# The kernel's fused feature maps under this mixer's option names.
FEATURE_MAPS = {"elu": "elu+1", "relu": "relu"}


class LinearAttention(QKVMixer):
    """``o_i = Σ_j φ(q_i)·φ(k_j) v_j / (Σ_j φ(q_i)·φ(k_j) + eps)`` over all tokens, in O(N·D²).

    Paper: "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention"
    (Katharopoulos et al., ICML 2020, arXiv 2006.16236), non-causal form. ``feature_map`` is
    ``"elu"`` (ELU+1, the paper's) or ``"relu"``; ``eps`` is added to the sum-form denominator.
    Prefix tokens join the sums like any other token. The core is
    :func:`linvision.kernels.linear_attn.linear_attention` (fp32 state); ``backend`` picks its
    implementation. Without autograd on the PyTorch path, the mixer streams tokens in chunks
    through projection, state, output and projection, so Q, K and V of the whole sequence never exist at once.

    A teacher's q/k norms (:meth:`carry_qk_norm`) act on q and k before ``φ``; a teacher's RoPE
    (``rope``) follows RoFormer's linear form (:func:`linvision.mixers.rotary.rotary_linear_attention`:
    rotated ``φ(q), φ(k)`` in the numerator, unrotated normaliser; ``φ`` in fp32, not streamed).
    """

    supports_rope = True
    supports_qk_norm = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        feature_map: str = "elu",
        eps: float = 1e-6,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, qkv_bias, proj_bias)
        self.feature_map = check_choice("feature_map", feature_map, tuple(FEATURE_MAPS))
        self.eps = check_float("eps", eps, min=0.0)
        self.backend = check_backend(backend)

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int, rope: Optional[Rotation] = None) -> Tensor:
        phi = FEATURE_MAPS[self.feature_map]
        if rope is not None:
            q, k, v = self.project_qkv(x)
            acc = accumulation_dtype(x.dtype)
            fq, fk = (apply_feature_map(t.to(acc), phi, 0.0) for t in (q, k))
            o = rotary_linear_attention(fq, fk, v.to(acc), rope, num_prefix_tokens, self.eps, self.backend)
            return self.proj(o.to(x.dtype).flatten(2))
        # projections, state, outputs and projection per chunk of tokens: q, k, v are never held whole (without
        # autograd, on the PyTorch path; see QKVMixer.qkv_rows and linear_attention_streamed)
        q, k, v = self.qkv_rows(x)
        N = x.shape[1]
        return linear_attention_streamed(
            lambda a, b: (q(a, b), None), lambda a, b: (k(a, b), None), v, N, num_keys=N, feature_map=phi,
            eps=self.eps, output=lambda a, b, o: self.proj(o.flatten(2)), backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_map={self.feature_map!r}, eps={self.eps}"
